"""Real Flower simulations in process (Ray backend): the run folder contract, resume, learning."""

import json

import numpy as np
import pytest
import torch
import yaml

from hdf.checkpoint import read_checkpoint
from hdf.config import compose
from hdf.runfolder.selection import select_round
from server.app import open_run, resolve_resume
from simulations.run import simulate

SOURCES = "data.sources=[studio,webcam,cctv,phone]"


def _cfg(tmp_path, *extra: str):
    return compose(
        [
            "experiment=tiny",
            SOURCES,
            "data.heldout=[phone]",
            f"data.root={tmp_path / 'cache'}",
            f"output.root={tmp_path / 'runs'}",
            *extra,
        ]
    )


def test_simulation_writes_the_run_folder_contract(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    run = open_run(cfg)
    simulate(cfg, run)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r["lambda"]) == {"studio", "webcam", "cctv"}
        assert sum(r["lambda"].values()) == pytest.approx(1.0)
        assert set(r["train"]) == {"studio", "webcam", "cctv"}
        for v in r["train"].values():
            assert {"loss", "uar", "war"} <= set(v) and 0 <= v["uar"] <= 1
        assert set(r["heldout"]) == {"phone"}
        assert {"uar", "war"} <= set(r["heldout"]["phone"])
    assert rows[-1]["replied"] == 3 and rows[-1]["rejected"] == []
    # the same keys, in the same order, with one exchange a round (the default) as with two
    first = ["round", "lambda", "train", "heldout", "heldout_adapted", "rejected", "flagged"]
    assert list(rows[0]) == [*first, "seconds"]
    rest = ["clients", "sent", "replied", "rejected", "flagged", "kept_previous_model", "seconds"]
    assert all(list(r) == [*first[:5], *rest] for r in rows[1:])
    for name in ("config.yaml", "checkpoint.pt", "report.md", "lambda.png", "done", "best.pt"):
        assert (run.path / name).exists(), name
    best = json.loads((run.path / "best.json").read_text())
    assert best["round"] == select_round(rows).round
    assert read_checkpoint(run.path / "best.pt")[0]["round"] == best["round"]
    ckpt, _ = read_checkpoint(run.path)
    assert ckpt["round"] == 2
    assert set(ckpt["strategy"]["lambda"]) == {0, 1, 2}  # keyed by source index


def test_average_of_the_late_rounds_is_scored_and_kept(tmp_path, monkeypatch) -> None:
    """server.average_after=0 over 2 rounds: average.pt holds the mean of rounds 1 and 2's
    global models (each taken when its round's checkpoint is written) and the batch counters of
    round 2; average.json scores it on every source like a metrics row, and says which rounds."""
    from hdf.npy import torch_state
    from server.federation import Federation

    models: dict[int, dict[str, torch.Tensor]] = {}
    save = Federation.checkpoint

    def keep(self, server_round: int) -> None:
        models[server_round] = torch_state(self.arrays)
        save(self, server_round)

    monkeypatch.setattr(Federation, "checkpoint", keep)
    cfg = _cfg(tmp_path, "server.average_after=0", "strategy=dro")
    run = open_run(cfg)
    simulate(cfg, run)
    avg = json.loads((run.path / "average.json").read_text())
    assert avg["average"] == {"first_round": 1, "last_round": 2, "models": 2}
    assert avg["round"] == 2 and set(avg["train"]) == {"studio", "webcam", "cctv"}
    assert set(avg["heldout"]) == {"phone"} and 0 <= avg["heldout"]["phone"]["uar"] <= 1
    model = read_checkpoint(run.path / "average.pt")[0]["model"]
    moved = 0
    for k, v in model.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (models[1][k] + models[2][k]) / 2)
            moved += int(not torch.equal(v, models[2][k]))
        else:
            assert torch.equal(v, models[2][k]), k
    assert moved > 0  # the average is not the last model
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert avg["train"] != rows[-1]["train"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ("deterministic=true",),
        ("deterministic=true", "strategy=feddg_ga"),
        ("deterministic=true", "strategy=drfa", "strategy.fraction_train=0.34"),
    ],
)
def test_one_exchange_per_round_gives_the_same_rows_and_model(tmp_path, monkeypatch, extra):
    """server.eval_in_train folds each round's evaluation into the next round's exchange:
    3 exchanges for 2 rounds instead of 5, and the same numbers (FedDG-GA moves its weights on
    the evaluation; DRFA trains one sampled source a round and moves lambda on every source's
    validation loss: the two others get evaluate messages in the training exchange)."""
    from server.federation import Federation

    exchange = Federation.exchange
    counts: list[int] = []

    def counted(self, msgs):
        counts.append(len(msgs))
        return exchange(self, msgs)

    monkeypatch.setattr(Federation, "exchange", counted)
    rows, models = {}, {}
    for fold in (True, False):
        cfg = _cfg(tmp_path, *extra, f"server.eval_in_train={fold}", f"name=fold{fold}")
        run = open_run(cfg)
        simulate(cfg, run)
        rows[fold] = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
        models[fold] = read_checkpoint(run.path)[0]["model"]
        for r in rows[fold]:
            r.pop("seconds")
    trained = 1 if "strategy=drfa" in extra else 3
    assert counts == [3, 3, 3, 3, trained, 3, trained, 3]  # folded, then apart
    assert rows[True] == rows[False]
    for k in models[True]:
        assert torch.equal(models[True][k], models[False][k]), k


@pytest.mark.slow
def test_sequential_rounds_visit_one_site_per_exchange(tmp_path, monkeypatch) -> None:
    """strategy=sequential: each round's sites train one after another, one message per
    exchange and each to another site; the round's evaluation takes an exchange of its own
    (3 messages: the held-out source is scored on the server), and the rows keep the contract."""
    from server.federation import Federation

    exchange = Federation.exchange
    sent: list[list[int]] = []

    def counted(self, msgs):
        sent.append([m.metadata.dst_node_id for m in msgs])
        return exchange(self, msgs)

    monkeypatch.setattr(Federation, "exchange", counted)
    cfg = _cfg(tmp_path, "strategy=sequential")
    run = open_run(cfg)
    simulate(cfg, run)
    assert [len(m) for m in sent] == [3, 1, 1, 1, 3, 1, 1, 1, 3]
    for visits in (sent[1:4], sent[5:8]):
        assert sorted(n for (n,) in visits) == sorted(sent[0])
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["sent"] == r["replied"] == 3 and not r["rejected"] for r in rows[1:])
    assert set(rows[-1]["clients"]) == {"studio", "webcam", "cctv"}


@pytest.mark.slow
def test_two_deterministic_runs_write_the_same_bits(tmp_path) -> None:
    """Two runs of one config from scratch, each generating its own data, write the same
    metrics.jsonl lines (apart from `seconds`) and the same final model, wherever Ray runs the
    sites: one CPU each (as many worker processes as cores allow) or one worker process serving
    every site in turn with the same single thread."""
    import os

    layouts = {
        "spread": (),
        "one_process": (f"simulation.num_cpus_per_client={os.cpu_count() or 1}", "train.threads=1"),
    }
    lines, models = {}, {}
    for name, extra in layouts.items():
        cfg = compose(
            [
                "experiment=tiny",
                SOURCES,
                "data.heldout=[phone]",
                f"data.root={tmp_path / name / 'cache'}",
                f"output.root={tmp_path / name / 'runs'}",
                "deterministic=true",
                *extra,
            ]
        )
        run = open_run(cfg)
        simulate(cfg, run)
        rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
        lines[name] = [json.dumps({k: v for k, v in r.items() if k != "seconds"}) for r in rows]
        models[name] = read_checkpoint(run.path)[0]["model"]
    assert len(lines["spread"]) == 3 and lines["spread"] == lines["one_process"]
    for k, v in models["spread"].items():
        assert torch.equal(v, models["one_process"][k]), k


class Killed(RuntimeError):
    """The server process dying mid-run."""


def _same_run(a_path, b_path) -> None:
    """Bit-identical final checkpoints and last metrics rows (rounds 0..2 logged once each)."""
    a, b = (read_checkpoint(p)[0] for p in (a_path, b_path))
    assert a["round"] == b["round"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["strategy"] == b["strategy"]
    opt_a, opt_b = a["server_opt"], b["server_opt"]
    assert opt_a["steps"] == opt_b["steps"] == 2 and opt_a["m"]
    assert set(opt_a["v"]) == set(opt_b["v"])
    for k in opt_a["m"]:
        np.testing.assert_array_equal(opt_a["m"][k], opt_b["m"][k])
        np.testing.assert_array_equal(opt_a["v"][k], opt_b["v"][k])
    assert not any("running" in k or "num_batches" in k for k in opt_a["m"])  # buffers: the mix
    rows_a = [json.loads(x) for x in (a_path / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows_b] == [0, 1, 2]
    assert rows_a[-1]["train"] == rows_b[-1]["train"]
    assert rows_a[-1]["heldout"] == rows_b[-1]["heldout"]
    if (a_path / "average.pt").exists():
        avg_a, avg_b = (read_checkpoint(p / "average.pt")[0] for p in (a_path, b_path))
        assert avg_a["average"] == avg_b["average"]
        for k in avg_a["model"]:
            assert torch.equal(avg_a["model"][k], avg_b["model"][k]), k


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, monkeypatch) -> None:
    """Resume is bit-identical to a run in one go (CPU, deterministic), both ways:
    a 2-round run that died after round 1, resumed with `resume=` alone, keeps its 2 rounds;
    a 1-round run extended with an explicit `rounds=2` (its config.yaml then says 2). The
    server optimiser (FedYogi: moments carried in the checkpoint) is on, and sites score with
    their own BN statistics (`local_norm=recompute`, re-estimated for each received model)."""
    from server.federation import Federation

    # Sites' kept state (local_norm=stats/all, kept optimiser moments) lives in Flower's
    # context.state, which a resumed run, a new Flower run, starts without: bit-exact resume
    # holds for what the server checkpoints, so the sites keep nothing here; `recompute` gives
    # them their own statistics without keeping any.
    det = (
        "deterministic=true",
        "server_opt.name=yogi",
        "server_opt.lr=0.01",
        "strategy.local_norm=recompute",
        "server.average_after=0",  # the average of rounds 1 and 2 lives in the checkpoint too
    )
    full_cfg = _cfg(tmp_path, *det, "name=full")
    full = open_run(full_cfg)
    simulate(full_cfg, full)

    # interrupted: the server dies right after checkpointing round 1
    save = Federation.checkpoint

    def die_after_round_1(self, server_round: int) -> None:
        save(self, server_round)
        if server_round == 1:
            raise Killed("killed after round 1")

    died_cfg = _cfg(tmp_path, *det, "name=died")
    died = open_run(died_cfg)
    monkeypatch.setattr(Federation, "checkpoint", die_after_round_1)
    with pytest.raises(Killed):
        simulate(died_cfg, died)
    monkeypatch.setattr(Federation, "checkpoint", save)
    argv = [f"resume={died.path}"]  # what `python -m simulations.run resume=<folder>` composes
    resumed = resolve_resume(compose(argv), argv)
    assert resumed.rounds == 2  # the run's own rounds, not the default config's 20
    simulate(resumed, open_run(resumed))
    _same_run(full.path, died.path)

    # extended: 1 round, then rounds=2 given explicitly
    part_cfg = _cfg(tmp_path, *det, "name=part", "rounds=1")
    part = open_run(part_cfg)
    simulate(part_cfg, part)
    argv = [f"resume={part.path}", "rounds=2"]
    extended = resolve_resume(_cfg(tmp_path, *argv), argv)
    simulate(extended, open_run(extended))
    _same_run(full.path, part.path)
    saved = yaml.safe_load((part.path / "config.yaml").read_text())
    assert saved["rounds"] == 2 and saved["resume"] is None


@pytest.mark.slow
def test_federation_improves_the_worst_source(tmp_path) -> None:
    """A short real federation at the default clip size and model ends with a better worst
    training source (validation UAR) than the initial model."""
    cfg = compose(
        [
            "data.sources=[studio,movie,webcam,phone]",
            "data.heldout=[phone]",
            "rounds=6",
            "output.wandb=disabled",
            f"data.root={tmp_path / 'cache'}",
            f"output.root={tmp_path / 'runs'}",
        ]
    )
    run = open_run(cfg)
    simulate(cfg, run)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    worst = [min(v["uar"] for v in r["train"].values()) for r in rows]
    assert worst[-1] > worst[0] + 0.05, worst
    assert np.mean([v["uar"] for v in rows[-1]["train"].values()]) > 0.25
