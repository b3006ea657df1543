"""Misbehaving ClientApps in a real Flower simulation (issue 12).

One case per lie: each asserts its rejection or flag, with the reason, in metrics.jsonl; each
simulation must finish with lambda and the global model finite. Lies that do not interfere share
a simulation (one misbehaving source each, or one per round), so three small simulations cover
every case: five sources (DRO on the class-balanced loss, so both loss-befores are exercised),
two sources (the norm check with two replies), and a forged query reply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hdf.config import compose
from server.app import open_run
from server.identity import DuplicateSource
from simulations.run import simulate
from tests.misbehaving_client import FORGED_LOSS, Plan, misbehaving_app

FIVE = ["studio", "webcam", "movie", "cctv", "night_ir"]  # partition p serves source index p
TWO = ["studio", "webcam"]


@dataclass(frozen=True)
class Sim:
    sources: list[str]
    rounds: int
    plan: Plan
    extra: tuple[str, ...] = ()


SIMS = {
    "five": Sim(
        FIVE,
        2,
        {
            (0, "train", 1): "weights_nan",
            (1, "train", 1): "weights_x1000",
            (2, "train", 1): "loss_x100",
            (3, "train", 1): "num_examples_1e12",
            (4, "train", 1): "forge_source",  # claims source (4 + 2) % 5 = 1
            (0, "train", 2): "balanced_nan",
            (1, "train", 2): "loss_nan",
            (2, "train", 2): "loss_x1e6",
            (3, "train", 2): "loss_negative",
            (0, "evaluate", None): "forge_marked",  # claims source 2, with a marked loss
            (1, "evaluate", None): "eval_nan",
            (4, "evaluate", None): "no_metrics",
        },
        ("strategy.dro.loss=balanced",),
    ),
    "two": Sim(
        TWO,
        3,
        {
            (0, "train", 1): "weights_x1000",
            (0, "train", 2): "weights_nan",
            (0, "train", 3): "no_metrics",
            (1, "train", 3): "wrong_shape",
        },
    ),
}


def _cfg(root: Path, sim: Sim, name: str):
    return compose(
        [
            "experiment=tiny",
            f"data.sources=[{','.join(sim.sources)}]",
            "data.heldout=[]",
            "model.width=8",
            f"rounds={sim.rounds}",
            f"name={name}",
            f"data.root={root / 'cache'}",
            f"output.root={root / 'runs'}",
            *sim.extra,
        ]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """Each simulation runs once, on first use; the synthetic data cache is shared."""
    root = tmp_path_factory.mktemp("misbehaving")
    done: dict[str, Any] = {}

    def get(name: str):
        if name not in done:
            sim = SIMS[name]
            cfg = _cfg(root, sim, name)
            run = open_run(cfg)
            k = len(sim.sources)
            simulate(cfg, run, misbehaving_app(sim.plan, lambda own: (own + 2) % k))
            rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
            done[name] = (run, rows)
        return done[name]

    return get  # type: ignore[return-value]


# (simulation, round, "rejected" | "flagged", reply kind or None, source index, reason part)
CASES = [
    ("five", 1, "rejected", "train", 0, "holds NaN or Inf"),  # NaN weights, 5 sources
    ("five", 1, "rejected", "train", 1, "update norm"),  # weights x1000, 5 sources
    ("five", 1, "flagged", None, 2, "over 2x the server-seen validation loss"),  # loss x100
    ("five", 1, "flagged", None, 3, "num-examples 1e+12 differs from the"),
    ("five", 1, "rejected", "train", 4, "reports source 1 but registered as source 4"),
    ("five", 2, "rejected", "train", 0, "'loss-before-balanced' is not finite"),
    ("five", 2, "rejected", "train", 1, "'loss-before' is not finite"),
    ("five", 2, "rejected", "train", 2, "is outside [0, 10000]"),  # loss x1e6
    ("five", 2, "rejected", "train", 3, "is outside [0, 10000]"),  # negative loss
    ("five", 0, "rejected", "evaluate", 0, "reports source 2 but registered as source 0"),
    ("five", 1, "rejected", "evaluate", 1, "'loss' is not finite"),
    ("five", 2, "rejected", "evaluate", 4, "no MetricRecord 'metrics'"),
    ("two", 1, "rejected", "train", 0, "over 10x the global model's norm"),  # x1000, 2 sources
    ("two", 2, "rejected", "train", 0, "holds NaN or Inf"),  # NaN weights, 2 sources
    ("two", 3, "rejected", "train", 0, "no MetricRecord 'metrics'"),
    ("two", 3, "rejected", "train", 1, "has shape"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sim", "rnd", "where", "kind", "source", "reason"),
    CASES,
    ids=[f"{c[0]}-r{c[1]}-{c[2]}-source{c[4]}" for c in CASES],
)
def test_each_lie_is_rejected_or_flagged_with_its_reason(
    runs, sim, rnd, where, kind, source, reason
) -> None:
    _, rows = runs(sim)
    entries = [
        e for e in rows[rnd][where] if e["source"] == source and (kind is None or e["kind"] == kind)
    ]
    assert len(entries) == 1, rows[rnd][where]
    assert reason in entries[0]["reason"], entries[0]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("sim", sorted(SIMS))
def test_the_run_finishes_and_lambda_and_model_stay_finite(runs, sim) -> None:
    run, rows = runs(sim)
    assert run.done
    assert [r["round"] for r in rows] == list(range(SIMS[sim].rounds + 1))
    for r in rows:
        lam = np.array(list(r["lambda"].values()))
        assert np.isfinite(lam).all() and lam.sum() == pytest.approx(1.0), r["lambda"]
        for scores in r["train"].values():
            assert math.isfinite(scores["loss"]) and scores["loss"] != FORGED_LOSS
    model = run.load_checkpoint()["model"]
    assert all(bool(v.float().isfinite().all()) for v in model.values())
    report = (run.path / "report.md").read_text()
    assert "## Rejected replies" in report
    assert ("## Flagged numbers" in report) == any(r["flagged"] for r in rows)


@pytest.mark.slow
def test_honest_sources_keep_their_scores_and_the_liars_lose_theirs(runs) -> None:
    """Source 0's forged evaluate reply (claiming source 2) is refused: movie keeps its own
    score; the sources whose evaluate replies were bad have no score in any round."""
    _, rows = runs("five")
    for r in rows:
        assert set(r["train"]) == {"movie", "cctv"}, r["train"]
    # round 1 mixed only the flagged sources' updates (movie: x100 loss, cctv: 1e12 clips)
    assert rows[1]["kept_previous_model"] is False
    assert sorted(rows[1]["clients"]) == ["cctv", "movie"]
    # round 2: four loss lies rejected; night_ir (bad only in evaluate) trains
    assert rows[2]["kept_previous_model"] is False
    assert sorted(rows[2]["clients"]) == ["night_ir"]


@pytest.mark.slow
def test_two_sources_with_only_bad_replies_keep_the_previous_model(runs) -> None:
    _, rows = runs("two")
    assert [r["kept_previous_model"] for r in rows[1:]] == [False, False, True]
    assert [sorted(r["clients"]) for r in rows[1:]] == [["webcam"], ["webcam"], []]


@pytest.mark.slow
def test_a_forged_query_reply_stops_a_simulation_before_round_1(tmp_path) -> None:
    """Partition 1 says it serves source 0: two nodes claim one source in a simulation."""
    sim = Sim(TWO, 1, {(1, "query", None): "forge_source"})
    cfg = _cfg(tmp_path, sim, "forged-query")
    run = open_run(cfg)
    with pytest.raises(DuplicateSource, match=r"nodes \d+ and \d+ both claim source index 0"):
        simulate(cfg, run, misbehaving_app(sim.plan, lambda own: 0))
    assert not (run.path / "metrics.jsonl").exists()


def test_progress_line_counts_rejected_updates_only() -> None:
    """3 sent, 3 replied, one train and one evaluate reply rejected: 2/3 updates, 1 flag."""
    from hdf.runfolder.report import format_row

    row = {
        "round": 1,
        "sent": 3,
        "replied": 3,
        "rejected": [{"kind": "train"}, {"kind": "evaluate"}],
        "flagged": [{"reason": "x"}],
        "clients": {},
        "lambda": {},
        "train": {},
        "heldout": {},
        "seconds": 1.0,
    }
    assert "updates 2/3 | flagged 1 |" in format_row(row, 2)
