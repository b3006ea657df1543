"""Leave-one-source-out sweeps: planning, skipping finished runs, the summary, a tiny real sweep."""

import json
import threading

import pytest

from server.outputs import DONE_FILE, METRICS_FILE
from simulations import loso

SOURCES = ["studio", "webcam", "movie"]
BASE = ["data.sources=[studio,webcam,movie]"]
EMPTY_CM = [[0] * 7 for _ in range(7)]


def _fake_launcher(uar: dict[tuple[str, str, int], float], calls: list):
    """Writes a 2-row metrics.jsonl and the done marker instead of running a federation."""

    def launch(run: loso.RunSpec) -> int:
        calls.append((run.strategy, run.heldout, run.seed))
        u = uar[(run.strategy, run.heldout, run.seed)]
        train = {
            s: {"uar": u + 0.1 * i, "war": u, "loss": 1.0}
            for i, s in enumerate(s for s in SOURCES if s != run.heldout)
        }
        rows = [
            {
                "round": r,
                "lambda": {s: 0.5 for s in train},
                "train": train,
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
    }
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
