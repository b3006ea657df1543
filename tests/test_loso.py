"""Leave-one-source-out sweeps: planning, skipping finished runs, the summary, a tiny real sweep."""

import json
import os
import subprocess
import threading

import pytest

from hdf.runfolder.averaging import AVERAGE_INFO_FILE
from hdf.runfolder.folder import DONE_FILE, METRICS_FILE
from simulations import loso

SOURCES = ["studio", "webcam", "movie"]
BASE = ["data.sources=[studio,webcam,movie]"]
EMPTY_CM = [[0] * 7 for _ in range(7)]


def _fake_launcher(
    uar: dict[tuple[str, str, int], float],
    calls: list,
    early: float = 0.0,
    adapted: bool = False,
    average: dict[str, float] | None = None,
):
    """Writes a 2-row metrics.jsonl and the done marker instead of running a federation.

    Round 1 scores u on the held-out source, round 0 scores 0; training sources score u + .1 i
    in round 1 and `early` more in round 0 (early > 0 makes round 0 the selected round). With
    `adapted`, rows also hold held-out scores after AdaBN (UAR + .2) and TENT (UAR + .1 on the
    first held-out source only). `average` {strategy: gain}: that strategy's runs also write
    average.json, round 1's row with every UAR `gain` higher."""

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
        gain = (average or {}).get(run.strategy)
        if gain is not None:
            row = json.loads(json.dumps(rows[1]))
            for part in (row["train"], row["heldout"]):
                for v in part.values():
                    v["uar"] += gain
            row["average"] = {"first_round": 1, "last_round": 1, "models": 1}
            (run.path / AVERAGE_INFO_FILE).write_text(json.dumps(row) + "\n")
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


def test_runs_record_their_code_and_reused_runs_of_other_code_are_named(
    tmp_path, capsys, monkeypatch
) -> None:
    """A sweep folder is named by its overrides, not its code: a re-run after a code change
    reuses finished runs, so each run's loso.json records the code (git describe) and the
    re-run says how many finished runs other code made, and which."""
    uar = {("fedavg", h, 0): 0.5 for h in SOURCES}
    argv = [*BASE, f"loso.root={tmp_path}", "loso.strategies=[fedavg]", "loso.seeds=[0]"]
    monkeypatch.setattr(loso, "code_version", lambda: "abc123")
    assert loso.main(argv, launcher=_fake_launcher(uar, [])) == 0
    runs = loso.plan(argv).runs
    assert [json.loads((r.path / loso.RUN_INFO).read_text())["code"] for r in runs] == [
        "abc123"
    ] * 3
    capsys.readouterr()
    assert loso.main(argv, launcher=_fake_launcher(uar, [])) == 0
    assert "warning" not in capsys.readouterr().out  # same code: nothing to say
    monkeypatch.setattr(loso, "code_version", lambda: "def456-dirty")
    info = runs[0].path / loso.RUN_INFO
    info.write_text(
        json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "code"})
    )
    assert loso.main(argv, launcher=_fake_launcher(uar, [])) == 0
    out = capsys.readouterr().out
    assert "warning: 3 finished runs of this sweep were made by other code" in out
    assert "2 at abc123, 1 at unknown; this is def456-dirty" in out


def test_code_version_is_the_checkouts_commit_or_unknown(tmp_path) -> None:
    """Inside this checkout: git's description of HEAD; outside any git checkout: unknown."""
    here = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if here:
        assert here in loso.code_version()
    assert loso.code_version(tmp_path) == "unknown"


def _three_way(
    tmp_path, early: float = 0.0, average: dict[str, float] | None = None
) -> tuple[dict, str]:
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
    loso.main(argv, launcher=_fake_launcher(uar, [], early, average=average))
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


def test_averaged_model_is_scored_beside_the_last_round(tmp_path) -> None:
    """dro's averaged models score .05 above their last rounds everywhere, the pooled ones .02;
    fedavg has none. vs_last is +.05 with no spread; the ratios read the averages: held-out
    (.6 + .05) / (.8 + .02), in-distribution (.65 + .05) / (.85 + .02)."""
    summary, report = _three_way(tmp_path, average={"dro": 0.05, "centralized": 0.02})
    assert "average" not in summary["fedavg"]
    avg = summary["dro"]["average"]
    assert avg["runs"] == 6 and avg["mean_heldout_uar"] == pytest.approx(0.65)
    assert avg["vs_last"]["heldout_mean"] == pytest.approx(
        {"diff": 0.05, "lo": 0.05, "hi": 0.05, "n": 6}
    )
    assert avg["vs_last"]["train_worst"]["diff"] == pytest.approx(0.05)
    assert "vs_fedavg" not in avg  # fedavg has no averaged model to pair with
    assert avg["vs_centralized"]["heldout_mean"]["diff"] == pytest.approx(-0.2 + 0.03)
    assert avg["ratio_to_centralized"] == pytest.approx(
        {"train_mean": 0.7 / 0.87, "heldout_mean": 0.65 / 0.82}
    )
    assert summary["dro"]["ratio_to_centralized"]["heldout_mean"] == pytest.approx(0.75)
    assert "## Averaged model (average.pt) and last round" in report
    assert "| dro | 60.0 / 65.0 | 50.0 / 55.0 |" in report
    assert "## Federated / centralized, averaged model (average.pt)" in report


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


def test_runs_at_once_are_refused_on_a_ray_cluster(tmp_path, monkeypatch) -> None:
    """Each run's client pool takes every CPU of a cluster, so runs at once would stall."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(ValueError, match=r"loso\.jobs=2 on the Ray cluster RAY_ADDRESS=10\.0\."):
        loso.plan([*BASE, f"loso.root={tmp_path}", "loso.jobs=2"])
    assert loso.plan([*BASE, f"loso.root={tmp_path}", "loso.jobs=1"]).jobs == 1
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match=r"simulation\.ray_address=10\.0\.0\.5:6379"):
        loso.plan([*BASE, "simulation.ray_address=10.0.0.5:6379", "loso.jobs=2"])
    assert loso.plan([*BASE, f"loso.root={tmp_path}", "loso.jobs=2"]).jobs == 2


def test_parts_run_on_several_machines_fill_one_sweep(tmp_path) -> None:
    """Machine A runs the studio part, machine B the others, into one shared loso.root; the full
    command then launches nothing and reports on all six runs (docs/deploy.md)."""
    uar = {(s, h, 0): 0.5 for s in ("fedavg", "dro") for h in SOURCES}
    root = [*BASE, f"loso.root={tmp_path}"]
    on_a: list = []
    on_b: list = []
    loso.main([*root, "loso.heldout=[studio]"], launcher=_fake_launcher(uar, on_a))
    loso.main([*root, "loso.heldout=[webcam,movie]"], launcher=_fake_launcher(uar, on_b))
    assert sorted(on_a + on_b) == sorted(uar)
    assert {h for _, h, _ in on_a} == {"studio"}
    again: list = []
    assert loso.main(root, launcher=_fake_launcher(uar, again)) == 0
    assert again == []
    summary = json.loads((loso.plan(root).path / "summary.json").read_text())
    assert set(summary["dro"]["heldout"]) == set(SOURCES)


def test_concurrent_runs_share_the_cores(monkeypatch) -> None:
    assert loso.threads_per_job(2, cores=2) == 1
    assert loso.threads_per_job(2, cores=16) == 8
    assert loso.threads_per_job(3, cores=2) == 1
    assert loso.threads_per_job(1, cores=4) == 4


def test_jobs_run_that_many_at_once(tmp_path, monkeypatch) -> None:
    """With loso.jobs=2 two launches overlap (each waits for a partner at a barrier, which a
    one-at-a-time sweep would never reach), and every run still finishes and is summarised."""
    uar = {(s, h, 0): 0.5 for s in ("fedavg", "dro") for h in SOURCES}
    calls: list = []
    fake = _fake_launcher(uar, calls)
    barrier = threading.Barrier(2, timeout=30)

    def paired(run: loso.RunSpec) -> int:
        barrier.wait()
        return fake(run)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = [*BASE, f"loso.root={tmp_path}", "loso.jobs=2"]
    assert loso.main(argv, launcher=paired) == 0
    assert sorted(calls) == sorted(uar)
    assert os.environ["OMP_NUM_THREADS"] == str(loso.threads_per_job(2))  # what children inherit
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
    # paired over the same runs: AdaBN - none is +.2 in each of the 6 (seed, source) runs (sd 0)
    # and on each seed's worst source; TENT has no worst (it scored studio only)
    paired_bn = f["adapted_vs_none"]["bn"]
    assert paired_bn["heldout_mean"] == pytest.approx(
        {"diff": 0.2, "lo": 0.2, "hi": 0.2, "n": 6}, abs=1e-9
    )
    assert paired_bn["heldout_worst"]["n"] == 2
    assert f["adapted_vs_none"]["tent"]["heldout_mean"]["n"] == 2
    assert "heldout_worst" not in f["adapted_vs_none"]["tent"]
    assert (
        "| fedavg | bn | +20.0 [+20.0, +20.0] (n=6) better | +20.0 [+20.0, +20.0] (n=2) better |"
        in report
    )


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
    summary = json.loads((sweep.path / "summary.json").read_text())
    # paired statistics compare within a variant too, and each variant with the first one
    assert summary["dro@base"]["vs_fedavg"]["heldout_mean"]["diff"] == pytest.approx(0.1)
    assert summary["dro@base"]["vs_variant"]["against"] == "dro@hdf"
    assert summary["dro@base"]["vs_variant"]["heldout_mean"]["diff"] == pytest.approx(-0.3)
    assert summary["fedavg@base"]["vs_variant"]["train_mean"]["diff"] == pytest.approx(-0.3)
    assert "vs_variant" not in summary["dro@hdf"] and "vs_fedavg" not in summary["fedavg@hdf"]
    assert "| dro@base | dro@hdf | -30.0 (n=1, too few pairs) |" in report
    assert "| dro@base | +10.0 | +10.0 | +10.0 | +10.0 | yes |" in report
    assert "| dro@hdf | +10.0 | +10.0 | +10.0 | +10.0 | yes |" in report
    with pytest.raises(ValueError, match=r"loso\.variants"):
        loso.plan([*BASE, "loso.variants=[a,b]"])
    with pytest.raises(ValueError, match=r"loso\.variants\.base=.*list of overrides"):
        loso.plan([*BASE, "loso.variants={base: sam.enabled=false}"])


def test_hdf_ablation_preset_switches_dam_dsm_and_sam_off_in_the_base_variant() -> None:
    from hdf.config import compose

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


def test_compute_matched_preset_plans_equal_client_epochs() -> None:
    """3 strategies x 5 seeds x 2 held-out sources; every run gets the same rounds and local
    epochs (pooled: epochs over the pooled data); the strategy list yields to the command line."""
    sweep = loso.plan(["experiment=compute_matched"])
    assert len(sweep.runs) == 30 and sweep.jobs == 2
    assert sweep.seeds == [0, 1, 2, 3, 4] and sweep.heldout == ["phone", "night_ir"]
    budgets = set()
    for run in sweep.runs:
        cfg = loso.compose(run.overrides)
        budgets.add((cfg.rounds * cfg.train.local_epochs, cfg.model.backbone))
    assert budgets == {(20, "tiny3d")}
    mine = loso.plan(["experiment=compute_matched", "loso.strategies=[centralized,dro]"])
    assert mine.strategies == ["centralized", "dro"] and len(mine.runs) == 20


def test_a_later_sweep_compares_with_the_pooled_runs_already_in_its_folder(tmp_path) -> None:
    """The compute-matched protocol: the pooled model at its own schedule (centralized@p2, .8)
    runs first; FedAvg at another (fedavg@q, .6) later, into the same folder. The second
    summary reads the first's runs and pairs them: held-out -.2 on all 3 sources, ratio .75.
    A run of another held-out source than the sweep's is not read."""
    root = [*BASE, f"loso.root={tmp_path}", "loso.seeds=[0]"]
    pooled = [*root, "loso.strategies=[centralized]", "loso.variants={p2: [train.lr=2e-3]}"]
    fed = [*root, "loso.strategies=[fedavg]", "loso.variants={q: [rounds=4]}"]
    fed.append("loso.heldout=[studio,webcam]")
    uar = {("centralized@p2", h, 0): 0.8 for h in SOURCES}
    uar |= {("fedavg@q", h, 0): 0.6 for h in SOURCES}
    loso.main([*pooled, "loso.heldout=[studio,webcam,movie]"], launcher=_fake_launcher(uar, []))
    loso.main(fed, launcher=_fake_launcher(uar, []))
    sweep = loso.plan(fed).with_found_entries()
    assert sorted(
        (r.strategy, r.heldout) for r in sweep.runs if r.strategy == "centralized@p2"
    ) == [
        ("centralized@p2", "studio"),
        ("centralized@p2", "webcam"),
    ]
    path = sweep.path
    summary = json.loads((path / "summary.json").read_text())
    assert list(summary) == ["fedavg@q", "centralized@p2"]
    assert summary["centralized@p2"]["heldout"].keys() == {"studio", "webcam"}  # not movie
    mine = summary["fedavg@q"]
    assert mine["vs_centralized"]["heldout_mean"] == pytest.approx(
        {"diff": -0.2, "lo": -0.2, "hi": -0.2, "n": 2}
    )
    assert mine["ratio_to_centralized"]["heldout_mean"] == pytest.approx(0.75)
    assert (
        "Entries ['centralized@p2'] are finished runs of earlier invocations"
        in (path / "report.md").read_text()
    )
