"""Leave-one-source-out sweeps: planning, skipping finished runs, the summary, a tiny real sweep."""

import json
import subprocess
import threading

import pytest

from server.outputs import DONE_FILE, METRICS_FILE
from simulations import loso

SOURCES = ["studio", "webcam", "movie"]
BASE = ["data.sources=[studio,webcam,movie]"]
EMPTY_CM = [[0] * 7 for _ in range(7)]


def _fake_launcher(uar: dict[tuple[str, str, int], float], calls: list, adapted: bool = False):
    """Writes a 2-row metrics.jsonl and the done marker instead of running a federation; with
    `adapted`, rows also hold held-out scores after AdaBN (UAR + .2) and TENT (UAR + .1 on the
    first held-out source only)."""

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
        if adapted:
            for row in rows:
                u_r = row["heldout"][run.heldout]["uar"]
                row["heldout_adapted"] = {
                    "bn": {run.heldout: {"uar": u_r + 0.2, "war": u_r, "confusion": EMPTY_CM}}
                }
                if run.heldout == SOURCES[0]:
                    row["heldout_adapted"]["tent"] = {
                        run.heldout: {"uar": u_r + 0.1, "war": u_r, "confusion": EMPTY_CM}
                    }
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


def test_report_shows_heldout_scores_with_and_without_adaptation(tmp_path) -> None:
    """fedavg, seeds 0 and 1: held-out UAR studio .4/.6, webcam .3/.5, movie .5/.7 (means .5,
    .4, .6: mean .5, worst .4). AdaBN adds .2 to every last-round score: means .7, .6, .8, mean
    .7, worst .6, +20 points on the worst; TENT scored only studio (.6, +20 over the plain worst
    .4). The plain summary is unchanged."""
    shift = {"studio": 0.0, "webcam": -0.1, "movie": 0.1}
    uar = {("fedavg", h, s): 0.4 + 0.2 * s + shift[h] for h in SOURCES for s in (0, 1)}
    argv = [*BASE, f"loso.root={tmp_path}", "loso.strategies=[fedavg]", "loso.seeds=[0,1]"]
    assert loso.main(argv, launcher=_fake_launcher(uar, [], adapted=True)) == 0
    sweep = loso.plan(argv)
    f = json.loads((sweep.path / "summary.json").read_text())["fedavg"]
    assert f["mean_heldout_uar"] == pytest.approx(0.5)
    assert f["worst_heldout_uar"] == pytest.approx(0.4)
    bn = f["adapted"]["bn"]
    assert bn["heldout"]["webcam"] == pytest.approx(
        {"uar_mean": 0.6, "uar_std": 0.1, "war_mean": 0.4, "war_std": 0.1}
    )
    assert bn["mean_heldout_uar"] == pytest.approx(0.7)
    assert bn["worst_heldout_uar"] == pytest.approx(0.6)
    assert set(f["adapted"]["tent"]["heldout"]) == {"studio"}
    report = (sweep.path / "report.md").read_text()
    assert "## Held-out sources after test-time adaptation" in report
    rows = [
        "| fedavg | none | 50.0 ± 10.0 | 40.0 ± 10.0 | 60.0 ± 10.0 | 50.0 | 40.0 | +0.0 |",
        "| fedavg | bn | 70.0 ± 10.0 | 60.0 ± 10.0 | 80.0 ± 10.0 | 70.0 | 60.0 | +20.0 |",
        "| fedavg | tent | 60.0 ± 10.0 | - | - | 60.0 | 60.0 | +20.0 |",
    ]
    assert all(row in report for row in rows), report


def test_variants_cross_strategies_and_compare_within_a_variant(tmp_path, monkeypatch) -> None:
    """variants {hdf: [], base: [sam.enabled=false]} x [fedavg, dro]: four entries, each run
    with its variant's overrides, each strategy file run by the worker. dro@base (UAR .3) is
    compared with fedavg@base (.2): +10 points, not with fedavg@hdf (.5)."""
    variants = "loso.variants={hdf: [], base: [sam.enabled=false]}"
    argv = [*BASE, f"loso.root={tmp_path}", "loso.heldout=[movie]", variants]
    sweep = loso.plan(argv)
    assert sweep.strategies == ["fedavg@hdf", "fedavg@base", "dro@hdf", "dro@base"]
    by = {r.strategy: r for r in sweep.runs}
    assert by["dro@base"].strategy_conf == "dro" and "strategy=dro" in by["dro@base"].overrides
    assert "sam.enabled=false" in by["dro@base"].overrides
    assert "sam.enabled=false" not in by["dro@hdf"].overrides
    assert by["fedavg@hdf"].strategy_conf == "fedavg"
    launched: list = []

    def fake_run(cmd, **kw):
        launched.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(loso.subprocess, "run", fake_run)
    by["dro@base"].path.mkdir(parents=True)
    assert loso.launch_subprocess(by["dro@base"]) == 0
    assert launched[0][3:6] == ["--worker", "dro", str(by["dro@base"].path)]
    monkeypatch.undo()
    uar = {("fedavg@hdf", "movie", 0): 0.5, ("dro@hdf", "movie", 0): 0.6}
    uar |= {("fedavg@base", "movie", 0): 0.2, ("dro@base", "movie", 0): 0.3}
    assert loso.main(argv, launcher=_fake_launcher(uar, [])) == 0
    report = (sweep.path / "report.md").read_text()
    assert "| dro@base | +10.0 | +10.0 | +10.0 | +10.0 | yes |" in report
    assert "| dro@hdf | +10.0 | +10.0 | +10.0 | +10.0 | yes |" in report
    with pytest.raises(ValueError, match=r"loso\.variants"):
        loso.plan([*BASE, "loso.variants=[a,b]"])
    with pytest.raises(ValueError, match=r"loso\.variants\.base=.*list of overrides"):
        loso.plan([*BASE, "loso.variants={base: sam.enabled=false}"])


def test_hdf_ablation_preset_switches_dam_dsm_and_sam_off_in_the_base_variant() -> None:
    from simulations.config import compose

    sweep = loso.plan(["experiment=loso_hdf_ablation"])
    assert sweep.strategies == ["fedavg@hdf", "fedavg@base", "dro@hdf", "dro@base"]
    assert len(sweep.seeds) >= 5
    hdf = compose(next(r for r in sweep.runs if r.strategy == "dro@hdf").overrides)
    base = compose(next(r for r in sweep.runs if r.strategy == "dro@base").overrides)
    assert hdf.model.dam.enabled and hdf.sam.enabled and hdf.dsm.supcon and hdf.dsm.balance
    assert not (base.model.dam.enabled or base.sam.enabled)
    assert not (base.dsm.supcon or base.dsm.ib or base.dsm.balance) and base.dsm.alpha == 1.0
    assert base.strategy.name == hdf.strategy.name == "dro" and base.rounds == hdf.rounds


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
