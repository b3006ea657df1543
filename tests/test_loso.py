"""Leave-one-source-out sweeps: planning, skipping finished runs, the summary, a tiny real sweep."""

import json
import threading

import pytest

from server.outputs import DONE_FILE, METRICS_FILE
from simulations import loso

SOURCES = ["studio", "webcam", "movie"]
BASE = ["data.sources=[studio,webcam,movie]"]
EMPTY_CM = [[0] * 7 for _ in range(7)]


def _fake_launcher(uar: dict[tuple[str, str, int], float], calls: list, early: float = 0.0):
    """Writes a 2-row metrics.jsonl and the done marker instead of running a federation.

    Round 1 scores u on the held-out source, round 0 scores 0; training sources score u + .1 i
    in round 1 and `early` more in round 0 (early > 0 makes round 0 the selected round)."""

    def launch(run: loso.RunSpec) -> int:
        calls.append((run.strategy, run.heldout, run.seed))
        u = uar[(run.strategy, run.heldout, run.seed)]
        names = [s for s in SOURCES if s != run.heldout]
        rows = [
            {
                "round": r,
                "lambda": {s: 0.5 for s in names},
                "train": {
                    s: {"uar": u + 0.1 * i + early * (r == 0), "war": u, "loss": 1.0}
                    for i, s in enumerate(names)
                },
                "seconds": 1.0,
                "heldout": {
                    run.heldout: {"uar": u * r, "war": u * r + 0.05, "confusion": EMPTY_CM}
                },
            }
            for r in (0, 1)
        ]
        (run.path / METRICS_FILE).write_text("".join(json.dumps(x) + "\n" for x in rows))
        (run.path / DONE_FILE).write_text("done\n")
        return 0

    return launch


def test_sweep_writes_summary_and_skips_finished_runs(tmp_path, capsys) -> None:
    """2 strategies x 3 held-out sources x 2 seeds, with made-up last-round UARs.

    fedavg: held-out UAR .4 and .6 on every source (seeds 0 and 1): mean .5, std .1; WAR
    .45/.65: mean .55. dro: .5 and .5 on studio/webcam, .7 and .9 on movie: means .5, .5, .8,
    so mean_heldout_uar .6, worst .5. worst_train_uar = the first training source's UAR (the
    others are +.1): the mean of the runs' UAR, fedavg .5, dro (.5 * 4 + .8 * 2) / 6 = .6;
    mean_train_uar = that + .05 (two training sources, the second .1 higher).
    """
    uar = {}
    for h in SOURCES:
        uar[("fedavg", h, 0)], uar[("fedavg", h, 1)] = 0.4, 0.6
        uar[("dro", h, 0)], uar[("dro", h, 1)] = (0.7, 0.9) if h == "movie" else (0.5, 0.5)
    calls: list = []
    argv = [*BASE, f"loso.root={tmp_path}", "loso.strategies=[fedavg,dro]", "loso.seeds=[0,1]"]
    assert loso.main(argv, launcher=_fake_launcher(uar, calls)) == 0
    assert len(calls) == 12
    sweep = loso.plan(argv)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(sweep.path.resolve())
    summary = json.loads((sweep.path / "summary.json").read_text())
    assert set(summary) == {"fedavg", "dro"}
    f = summary["fedavg"]
    assert set(f) == {
        "heldout",
        "mean_heldout_uar",
        "worst_heldout_uar",
        "worst_train_uar",
        "mean_train_uar",
        "selected",  # the same numbers at each run's best.pt round
    }
    assert set(summary["dro"]) == set(f) | {"vs_fedavg"}
    assert f["heldout"]["movie"] == pytest.approx(
        {"uar_mean": 0.5, "uar_std": 0.1, "war_mean": 0.55, "war_std": 0.1}
    )
    assert f["mean_heldout_uar"] == pytest.approx(0.5)
    assert f["worst_train_uar"] == pytest.approx(0.5)
    assert f["mean_train_uar"] == pytest.approx(0.55)
    d = summary["dro"]
    assert d["heldout"]["movie"]["uar_mean"] == pytest.approx(0.8)
    assert d["heldout"]["movie"]["uar_std"] == pytest.approx(0.1)
    assert d["mean_heldout_uar"] == pytest.approx(0.6)
    assert d["worst_heldout_uar"] == pytest.approx(0.5)
    assert d["worst_train_uar"] == pytest.approx(0.6)
    assert d["mean_train_uar"] == pytest.approx(0.65)
    report = (sweep.path / "report.md").read_text()
    assert "| dro | 50.0 ± 0.0 / 55.0 ± 0.0 |" in report
    # dro - fedavg: worst held-out .5 - .5, worst train .6 - .5, means .6 - .5 and .65 - .55
    assert "| dro | +0.0 | +10.0 | +10.0 | +10.0 | no |" in report
    assert (sweep.path / "heldout_uar.png").exists()
    assert (sweep.path / "lambda_dro.png").exists()
    assert (sweep.path / "confusion_fedavg_movie.png").exists()
    # A re-run launches nothing; adding a seed launches only the new runs, in the same folder.
    calls.clear()
    assert loso.main(argv, launcher=_fake_launcher(uar, calls)) == 0
    assert calls == []
    for h in SOURCES:
        uar[("fedavg", h, 2)] = uar[("dro", h, 2)] = 0.5
    more = [*argv[:-1], "loso.seeds=[0,1,2]"]
    loso.main(more, launcher=_fake_launcher(uar, calls))
    assert sorted(calls) == sorted((s, h, 2) for s in ("fedavg", "dro") for h in SOURCES)
    assert loso.plan(more).path == sweep.path


def _three_way(tmp_path, early: float = 0.0) -> tuple[dict, str]:
    """fedavg and dro as in the test above, plus centralized at .8 everywhere."""
    uar = {}
    for h in SOURCES:
        uar[("fedavg", h, 0)], uar[("fedavg", h, 1)] = 0.4, 0.6
        uar[("dro", h, 0)], uar[("dro", h, 1)] = (0.7, 0.9) if h == "movie" else (0.5, 0.5)
        uar[("centralized", h, 0)] = uar[("centralized", h, 1)] = 0.8
    argv = [
        *BASE,
        f"loso.root={tmp_path}",
        "loso.strategies=[fedavg,dro,centralized]",
        "loso.seeds=[0,1]",
    ]
    loso.main(argv, launcher=_fake_launcher(uar, [], early))
    path = loso.plan(argv).path
    return json.loads((path / "summary.json").read_text()), (path / "report.md").read_text()


def test_paired_differences_and_ratios_by_hand(tmp_path) -> None:
    """dro - fedavg held-out UAR per (seed, source), sorted: (.1, .1, .3, -.1, -.1, .3): mean .1,
    sd sqrt(.16 / 5), half-width t_{.975,5} 2.570582 * sd / sqrt(6) = .187731. Worst held-out per
    seed: (.5 - .4, .5 - .6): mean 0, half-width 12.7062 * .1. dro - centralized: (-.3, -.3,
    -.1, -.3, -.3, .1): mean -.2, half-width 2.570582 * sqrt(.028) / sqrt(6) = .175606: worse.
    Ratios to centralized: in-distribution .65 / .85, held-out .6 / .8."""
    summary, report = _three_way(tmp_path)
    d = summary["dro"]
    assert d["vs_fedavg"]["heldout_mean"] == pytest.approx(
        {"diff": 0.1, "lo": 0.1 - 0.1877288, "hi": 0.1 + 0.1877288, "n": 6}, abs=1e-6
    )
    assert d["vs_fedavg"]["heldout_worst"] == pytest.approx(
        {"diff": 0.0, "lo": -1.270620, "hi": 1.270620, "n": 2}, abs=1e-6
    )
    assert d["vs_fedavg"]["train_worst"] == pytest.approx(d["vs_fedavg"]["heldout_mean"])
    assert d["vs_centralized"]["heldout_mean"] == pytest.approx(
        {"diff": -0.2, "lo": -0.2 - 0.1756042, "hi": -0.2 + 0.1756042, "n": 6}, abs=1e-6
    )
    assert d["ratio_to_centralized"] == pytest.approx(
        {"train_mean": 0.65 / 0.85, "heldout_mean": 0.75}
    )
    assert "vs_fedavg" not in summary["fedavg"] and "vs_centralized" in summary["fedavg"]
    assert "ratio_to_centralized" not in summary["centralized"]
    assert "| dro | +10.0 [-8.8, +28.8] (n=6) not distinguishable |" in report
    assert "| dro | -20.0 [-37.6, -2.4] (n=6) worse |" in report
    assert "| dro | 0.76 | 0.75 |" in report


def test_selected_round_is_scored_beside_the_last(tmp_path) -> None:
    """Round 0 has the better training sources here, so it is every run's selected round, and
    its held-out UAR (0) is what the selected numbers report; the last round's are unchanged."""
    summary, report = _three_way(tmp_path, early=0.05)
    d = summary["dro"]
    assert d["mean_heldout_uar"] == pytest.approx(0.6)
    sel = d["selected"]
    assert sel["rounds"] == [0] * 6
    assert sel["mean_heldout_uar"] == 0.0 and sel["worst_train_uar"] == pytest.approx(0.65)
    assert sel["vs_fedavg"]["heldout_mean"]["diff"] == 0.0
    assert sel["vs_fedavg"]["train_worst"]["diff"] == pytest.approx(0.1)
    # against the pooled model's own selected round (held-out 0 there: no ratio)
    assert sel["ratio_to_centralized"] == {
        "train_mean": pytest.approx(0.7 / 0.9),
        "heldout_mean": None,
    }
    assert "## Last round and selected round (best.pt)" in report
    assert "| dro | 60.0 / 0.0 | 50.0 / 0.0 |" in report


def test_run_folders_are_named_by_their_overrides(tmp_path) -> None:
    a = loso.plan([*BASE, f"loso.root={tmp_path}", "loso.heldout=[movie]", "loso.seeds=[0]"])
    b = loso.plan([*BASE, f"loso.root={tmp_path}", "loso.heldout=[movie]", "loso.seeds=[0]"])
    c = loso.plan([*BASE, "rounds=3", f"loso.root={tmp_path}", "loso.heldout=[movie]"])
    assert [r.path for r in a.runs] == [r.path for r in b.runs]
    assert a.path != c.path and {r.path.name for r in a.runs}.isdisjoint(
        {r.path.name for r in c.runs}
    )
    assert [r.strategy for r in a.runs] == ["fedavg", "dro"]
    assert "data.heldout=[movie]" in a.runs[0].overrides


def test_bad_settings_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        loso.plan([*BASE, "loso.strategies=[nope]"])
    with pytest.raises(ValueError, match="not a source"):
        loso.plan([*BASE, "loso.heldout=[mars]"])
    with pytest.raises(ValueError, match="unknown loso settings"):
        loso.plan([*BASE, "loso.sed=[1]"])
    with pytest.raises(ValueError, match=r"loso\.jobs=0"):
        loso.plan([*BASE, "loso.jobs=0"])


def test_jobs_run_that_many_at_once(tmp_path) -> None:
    """With loso.jobs=2 two launches overlap (each waits for a partner at a barrier, which a
    one-at-a-time sweep would never reach), and every run still finishes and is summarised."""
    uar = {(s, h, 0): 0.5 for s in ("fedavg", "dro") for h in SOURCES}
    calls: list = []
    fake = _fake_launcher(uar, calls)
    barrier = threading.Barrier(2, timeout=30)

    def paired(run: loso.RunSpec) -> int:
        barrier.wait()
        return fake(run)

    argv = [*BASE, f"loso.root={tmp_path}", "loso.jobs=2"]
    assert loso.main(argv, launcher=paired) == 0
    assert sorted(calls) == sorted(uar)
    assert json.loads((loso.plan(argv).path / "summary.json").read_text())["dro"]


@pytest.mark.slow
def test_tiny_real_sweep(tmp_path) -> None:
    """3 sources, 2 strategies, 1 seed, 1 round, tiny sizes, one held-out source: real
    federations in subprocesses; the report and summary are written; a re-run runs nothing."""
    argv = [
        "experiment=tiny",
        *BASE,
        "rounds=1",
        f"output.root={tmp_path}",
        "output.wandb=disabled",
        "loso.heldout=[movie]",
        "loso.strategies=[fedavg,dro]",
        "loso.seeds=[0]",
    ]
    assert loso.main(argv) == 0
    sweep = loso.plan(argv)
    summary = json.loads((sweep.path / "summary.json").read_text())
    assert set(summary) == {"fedavg", "dro"}
    assert 0.0 <= summary["dro"]["heldout"]["movie"]["uar_mean"] <= 1.0
    assert (sweep.path / "report.md").exists()
    calls: list = []
    assert loso.main(argv, launcher=lambda run: calls.append(run) or 1) == 0
    assert calls == []


def test_compute_matched_preset_plans_equal_client_epochs() -> None:
    """3 strategies x 5 seeds x 2 held-out sources; every run gets the same rounds and local
    epochs (pooled: epochs over the pooled data); the strategy list yields to the command line."""
    sweep = loso.plan(["experiment=compute_matched"])
    assert len(sweep.runs) == 30 and sweep.jobs == 2
    assert sweep.seeds == [0, 1, 2, 3, 4] and sweep.heldout == ["phone", "night_ir"]
    budgets = set()
    for run in sweep.runs:
        cfg = loso.compose(run.overrides)
        budgets.add((int(cfg.rounds) * int(cfg.train.local_epochs), cfg.model.backbone))
    assert budgets == {(20, "tiny3d")}
    mine = loso.plan(["experiment=compute_matched", "loso.strategies=[centralized,dro]"])
    assert mine.strategies == ["centralized", "dro"] and len(mine.runs) == 20
