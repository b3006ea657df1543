"""Leave-one-source-out sweeps: one federation per held-out source x strategy x seed, one report.

    python -m simulations.loso                                   # every source, fedavg and dro
    python -m simulations.loso experiment=loso_compare           # the sized comparison preset
    python -m simulations.loso loso.strategies=[fedavg,dro,centralized,local] loso.seeds=[0,1,2]
    python -m simulations.loso loso.heldout=[phone,cctv] rounds=5
    python -m simulations.loso experiment=loso_hdf_ablation      # HDF vs base x FedAvg vs DRO

`loso.*` settings choose the sweep (they may also sit in an experiment file under `loso:`); every
other override is passed to each run. `loso.strategies` names files of `conf/strategy/`, plus
`centralized` (the pooled baseline, `simulations.centralized`). `loso.variants`, a mapping
{name: [overrides]}, runs every strategy once per variant with that variant's overrides; the
entries are then named `strategy@variant` (e.g. `dro@base`) and compared with `fedavg@variant`.

Runs go one after another (`loso.jobs=N`: N at once), each in its own process (a fresh Ray and
a fresh ClientApp cache), its output captured in `<run>/log.txt`. With `RAY_ADDRESS` (or
`simulation.ray_address`) every run joins that Ray cluster, one run at a time. Several machines
share a sweep by each running part of it (`loso.heldout=[...]`) into one `loso.root`: the folders
are named by the overrides, so the parts fill one sweep that the full command then reports on.
The sweep folder is named by a hash of the run overrides (not of the `loso.*` lists, so adding a
strategy or a seed reuses what is done) and each run folder by a hash of its own overrides
(DomainBed's sweep.py): a re-run skips runs with a `done` marker and resumes a run that died from
its checkpoint. The sweep folder gets report.md, plots and summary.json; its path is the last
line printed.

Every strategy is compared with FedAvg and with the pooled baseline by paired differences over
the (seed, held-out source) pairs both ran, with a 95 % paired-t interval (`simulations.stats`),
at the last round and at each run's selected round (`best.pt`, chosen on training sources only).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from omegaconf import OmegaConf

from server.outputs import CHECKPOINT_FILE, CONFIG_FILE, DONE_FILE, METRICS_FILE
from server.selection import select_round
from simulations.cli import command
from simulations.config import compose
from simulations.preflight import check_config, check_data
from simulations.ray_cluster import given_address
from simulations.stats import PairedDiff, paired_ci, verdict

LOSO_DEFAULTS: dict[str, Any] = {
    "strategies": ["fedavg", "dro"],  # conf/strategy file names, or "centralized"
    "seeds": [0],
    "heldout": None,  # null = every source of the data config, one at a time
    "root": None,  # null = <output.root>/loso
    "jobs": 1,  # runs at once, each its own process (2 on 2 cores fills start-up and idle gaps)
    "variants": None,  # null, or {name: [overrides]}: every strategy once per variant
}
CENTRALIZED = "centralized"
RUN_INFO = "loso.json"
LOG_FILE = "log.txt"


def _hash(items: Sequence[str], n: int = 10) -> str:
    return hashlib.sha1(json.dumps(list(items)).encode()).hexdigest()[:n]


@dataclass
class RunSpec:
    """One federation of the sweep."""

    strategy: str  # the sweep entry: a strategy file name, or "strategy@variant"
    heldout: str
    seed: int
    overrides: list[str]
    path: Path
    conf: str = ""  # the strategy file (or "centralized") when `strategy` names a variant

    @property
    def strategy_conf(self) -> str:
        return self.conf or self.strategy

    @property
    def done(self) -> bool:
        return (self.path / DONE_FILE).exists()


@dataclass
class Sweep:
    path: Path
    base: list[str]
    strategies: list[str]
    seeds: list[int]
    heldout: list[str]
    runs: list[RunSpec] = field(default_factory=list)
    jobs: int = 1
    variants: list[str] = field(default_factory=list)  # names, in the order given


def split_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """(`loso.*` settings given on the command line, every other override)."""
    loso = [a for a in argv if a.startswith("loso.")]
    rest = [a for a in argv if not a.startswith("loso.")]
    given = OmegaConf.to_container(OmegaConf.from_dotlist(loso)) if loso else {}
    assert isinstance(given, dict)
    return dict(given.get("loso", {})), rest


def plan(argv: Sequence[str]) -> Sweep:
    """The sweep's folder and its runs (nothing is run or written)."""
    given, base = split_args(argv)
    cfg = compose(base)
    check_config(cfg)
    preset = cfg.get("loso")
    preset = OmegaConf.to_container(preset) if preset is not None else {}
    settings = {**LOSO_DEFAULTS, **dict(preset), **given}
    unknown = set(settings) - set(LOSO_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown loso settings {sorted(unknown)}; known: {sorted(LOSO_DEFAULTS)}")
    from hdf.data import build_sources

    names = [s.name for s in build_sources(cfg.data)]
    check_data(cfg, every_split=True)  # each source is trained on and held out in turn
    heldout = list(settings["heldout"] or names)
    for h in heldout:
        if h not in names:
            raise ValueError(
                f"loso.heldout names {h!r}, not a source of data={cfg.data.name}: {names}"
            )
    strategies = [str(s) for s in settings["strategies"]]
    variants = parse_variants(settings["variants"])
    known = {p.stem for p in (Path(__file__).parent / "conf" / "strategy").glob("*.yaml")}
    for s in strategies:
        if s not in known | {CENTRALIZED}:
            raise ValueError(f"unknown strategy {s!r}; known: {sorted(known | {CENTRALIZED})}")
    root = Path(settings["root"] or Path(str(cfg.output.root)) / "loso")
    jobs = int(settings["jobs"])
    if jobs < 1:
        raise ValueError(f"loso.jobs={jobs}: give at least 1 (runs at once)")
    address, origin = given_address(cfg)
    if jobs > 1 and address is not None:
        raise ValueError(
            f"loso.jobs={jobs} on the Ray cluster {origin}={address}: each run's client pool "
            "takes every CPU of the cluster and holds it until the run ends, so runs at once "
            "stall on each other's clients; give loso.jobs=1 (each run spreads over the "
            "cluster), or split the sweep by loso.heldout across machines (docs/deploy.md)"
        )
    entries = [
        (f"{s}@{v}" if v else s, s, extra)
        for s in strategies
        for v, extra in (variants.items() if variants else [("", [])])
    ]
    sweep = Sweep(
        root / f"loso-{_hash(base)}",
        base,
        [label for label, _, _ in entries],
        [int(x) for x in settings["seeds"]],
        heldout,
        jobs=jobs,
        variants=list(variants or {}),
    )
    for h in heldout:
        for label, strategy, extra in entries:
            for seed in sweep.seeds:
                tag = label.replace("@", "-")
                own = [f"data.heldout=[{h}]", f"seed={seed}", f"name=loso-{tag}-{h}-s{seed}"]
                if strategy != CENTRALIZED:
                    own.insert(0, f"strategy={strategy}")
                overrides = [*base, *extra, *own]
                folder = f"{tag}-{h}-s{seed}-{_hash([label, *overrides], 8)}"
                sweep.runs.append(
                    RunSpec(
                        label,
                        h,
                        seed,
                        overrides,
                        sweep.path / "runs" / folder,
                        conf="" if label == strategy else strategy,
                    )
                )
    return sweep


def parse_variants(given: Any) -> dict[str, list[str]]:
    """`loso.variants` checked: {name: [override, ...]} (null: no variants)."""
    if not given:
        return {}
    if not isinstance(given, dict):
        raise ValueError(
            f"loso.variants={given!r}: give a mapping {{name: [overrides]}}, e.g. "
            "{hdf: [], base: [sam.enabled=false]}"
        )
    out = {}
    for name, overrides in given.items():
        if not str(name).replace("_", "").isalnum():
            raise ValueError(f"loso.variants name {name!r}: use letters, digits and _ only")
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ValueError(f"loso.variants.{name}={overrides!r}: give a list of overrides")
        out[str(name)] = list(overrides)
    return out


# ---- running ------------------------------------------------------------------------------------
def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Compute threads each of `jobs` concurrent runs may use: the cores shared out. Left to
    torch's default, every run takes all cores and two runs on 2 cores oversubscribe them (the
    pooled baseline's epochs took several times longer than one run alone)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, jobs))


def launch_subprocess(run: RunSpec) -> int:
    """Run one federation (or the centralized baseline) in a fresh process; log to log.txt."""
    cmd = [
        sys.executable,
        "-m",
        "simulations.loso",
        "--worker",
        run.strategy_conf,
        str(run.path),
        *run.overrides,
    ]
    with open(run.path / LOG_FILE, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), check=False
        )
    return proc.returncode


def worker(strategy: str, run_dir: str, overrides: list[str]) -> int:
    """Inside the child process: run (or resume) one run into `run_dir`."""
    from server.app import open_run, resolve_resume
    from server.outputs import RunFolder

    path = Path(run_dir)
    if strategy == CENTRALIZED:
        from simulations.centralized import train_centralized

        (path / METRICS_FILE).unlink(missing_ok=True)  # no checkpoint: start over
        train_centralized(compose(overrides), RunFolder(path))
        return 0
    from simulations.run import simulate

    if (path / CHECKPOINT_FILE).exists() and (path / CONFIG_FILE).exists():
        cfg = resolve_resume(compose([*overrides, f"resume={path}"]), overrides)
    else:
        (path / METRICS_FILE).unlink(missing_ok=True)  # rows of a run that died before round 0
        cfg = compose(overrides)
    run = open_run(cfg, str(path))
    simulate(cfg, run)
    return 0


def run_sweep(sweep: Sweep, launcher: Callable[[RunSpec], int] = launch_subprocess) -> None:
    sweep.path.mkdir(parents=True, exist_ok=True)
    info = {
        "overrides": sweep.base,
        "strategies": sweep.strategies,
        "seeds": sweep.seeds,
        "heldout": sweep.heldout,
    }
    (sweep.path / "sweep.json").write_text(json.dumps(info, indent=2) + "\n")
    todo = [r for r in sweep.runs if not r.done]
    if sweep.jobs > 1:  # each child process reads it when torch starts; a user's value wins
        os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_job(sweep.jobs)))
    print(
        f"sweep {sweep.path}: {len(sweep.runs)} runs, {len(sweep.runs) - len(todo)} done, "
        f"{min(sweep.jobs, max(len(todo), 1))} at a time",
        flush=True,
    )

    def one(i: int, run: RunSpec) -> None:
        run.path.mkdir(parents=True, exist_ok=True)
        print(
            f"[{i}/{len(todo)}] {run.strategy} held-out {run.heldout} seed {run.seed} -> "
            f"{run.path}",
            flush=True,
        )
        t0 = time.monotonic()
        rc = launcher(run)
        wall = time.monotonic() - t0
        status = (
            "done" if rc == 0 and run.done else f"FAILED (exit {rc}; see {run.path / LOG_FILE})"
        )
        print(f"    [{i}/{len(todo)}] {status} in {wall:.0f}s", flush=True)
        info = {
            "strategy": run.strategy,
            "heldout": run.heldout,
            "seed": run.seed,
            "overrides": run.overrides,
            "wall_s": wall,
            "jobs": sweep.jobs,
            "returncode": rc,
        }
        (run.path / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")

    # Threads only wait on child processes; each run has its own process, Ray and folder.
    with ThreadPoolExecutor(max_workers=sweep.jobs) as pool:
        for f in [pool.submit(one, i, run) for i, run in enumerate(todo, 1)]:
            f.result()


# ---- collecting ---------------------------------------------------------------------------
def _rows(run: RunSpec) -> list[dict[str, Any]]:
    f = run.path / METRICS_FILE
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs))  # population std: 0 with one seed


AT = ("last", "selected")  # which round of a run is scored: its last, or its best.pt round
METRICS = ("heldout_mean", "heldout_worst", "train_mean", "train_worst")
BASELINES = {"vs_fedavg": "fedavg", "vs_centralized": CENTRALIZED}
Values = dict[tuple[int, str], dict[str, Any]]  # (seed, held-out source) -> one run's numbers


def _pick(rows: list[dict[str, Any]], at: str) -> dict[str, Any] | None:
    """The row scored for a run: its last, or its selected round (training sources only)."""
    if not rows:
        return None
    if at == "last":
        return rows[-1]
    chosen = select_round(rows)
    return next((r for r in rows if r["round"] == chosen.round), None) if chosen else rows[-1]


def run_values(sweep: Sweep, strategy: str, at: str) -> Values:
    """Per finished run of `strategy`: held-out UAR and WAR, training-source UARs, round."""
    out: Values = {}
    for r in sweep.runs:
        if r.strategy != strategy or not r.done:
            continue
        row = _pick(_rows(r), at)
        if row is None:
            continue
        v: dict[str, Any] = {"round": row["round"]}
        held = row.get("heldout", {}).get(r.heldout)
        if held is not None:
            v["heldout"], v["heldout_war"] = held["uar"], held["war"]
        adapted = {
            method: by_source[r.heldout]["uar"]
            for method, by_source in row.get("heldout_adapted", {}).items()
            if r.heldout in by_source
        }
        if adapted:
            v["adapted"] = adapted
        train = {n: x["uar"] for n, x in row.get("train", {}).items()}
        if train:
            v["train_by_source"] = train
            v["train_mean"] = float(np.mean(list(train.values())))
            v["train_worst"] = float(min(train.values()))
        out[(r.seed, r.heldout)] = v
    return out


def aggregate(values: Values, heldout: list[str]) -> dict[str, float | None]:
    """mean/worst held-out UAR (over held-out sources of their seed means) and mean/worst
    training-source UAR (averaged over runs) of one strategy's runs."""
    by_source = {
        h: [v["heldout"] for (_, hh), v in values.items() if hh == h and "heldout" in v]
        for h in heldout
    }
    means = [float(np.mean(x)) for x in by_source.values() if x]
    train = [v for v in values.values() if "train_mean" in v]
    return {
        "mean_heldout_uar": float(np.mean(means)) if means else None,
        "worst_heldout_uar": float(np.min(means)) if means else None,
        "worst_train_uar": float(np.mean([v["train_worst"] for v in train])) if train else None,
        "mean_train_uar": float(np.mean([v["train_mean"] for v in train])) if train else None,
    }


def paired(a: Values, b: Values, metric: str, heldout: list[str]) -> tuple[list[float], ...]:
    """The paired samples of `metric` for strategies a and b (pairs both have).

    Per (seed, held-out source) run: heldout_mean is its held-out UAR, train_mean / train_worst
    its training sources' mean / worst validation UAR. heldout_worst pairs per seed: the worst
    held-out source of that seed (only seeds with every held-out source done in both), so its
    n is the number of seeds.
    """
    if metric == "heldout_worst":
        xs, ys = [], []
        for seed in sorted({k[0] for k in a}):
            keys = [(seed, h) for h in heldout]
            if all("heldout" in a.get(k, {}) and "heldout" in b.get(k, {}) for k in keys):
                xs.append(min(a[k]["heldout"] for k in keys))
                ys.append(min(b[k]["heldout"] for k in keys))
        return xs, ys
    field_ = "heldout" if metric == "heldout_mean" else metric
    keys = sorted(k for k in a if field_ in a[k] and field_ in b.get(k, {}))
    return [a[k][field_] for k in keys], [b[k][field_] for k in keys]


def baseline_of(entry: str, base: str, entries: Iterable[str]) -> str | None:
    """The entry `entry` is compared with for `base` ("fedavg", "centralized"): the base of the
    same variant ("dro@base" -> "fedavg@base") where the sweep has it, else the plain base."""
    _, at, variant = entry.partition("@")
    names = set(entries)
    for candidate in (f"{base}{at}{variant}", base):
        if candidate in names:
            return None if candidate == entry else candidate
    return None


def variant_reference(entry: str, variants: list[str]) -> str | None:
    """The same strategy under the sweep's first variant ("dro@base" -> "dro@hdf" when the
    variants are [hdf, base]): what a variant is measured against; None for the first itself."""
    strategy, at, variant = entry.partition("@")
    if not at or not variants or variant == variants[0]:
        return None
    return f"{strategy}@{variants[0]}"


def _compare(mine: Values, other: Values, heldout: list[str]) -> dict[str, Any]:
    """{metric: {diff, lo, hi, n}} of `mine` minus `other` over the pairs both have."""
    out = {}
    for metric in METRICS:
        xs, ys = paired(mine, other, metric, heldout)
        if xs:
            out[metric] = paired_ci(xs, ys).as_dict()
    return out


def comparisons(
    values: dict[str, Values], heldout: list[str], variants: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per entry: `vs_fedavg` / `vs_centralized` {metric: {diff, lo, hi, n}} (paired t), against
    the baseline of the same variant; with variants, `vs_variant` against the same strategy under
    the first variant (`against` names it); `adapted_vs_none` {method: {heldout_mean,
    heldout_worst}}: held-out UAR after test-time adaptation minus without, same runs."""
    out: dict[str, dict[str, Any]] = {}
    for entry, mine in values.items():
        out[entry] = {}
        for key, base in BASELINES.items():
            other = baseline_of(entry, base, values)
            if other is not None:
                out[entry][key] = _compare(mine, values[other], heldout)
        ref = variant_reference(entry, variants or [])
        if ref in values:
            out[entry]["vs_variant"] = {"against": ref, **_compare(mine, values[ref], heldout)}
        methods = sorted({m for v in mine.values() for m in v.get("adapted", {})} - {"none"})
        adapted = {}
        for method in methods:
            moved = {
                k: {**v, "heldout": v["adapted"][method]}
                for k, v in mine.items()
                if method in v.get("adapted", {})
            }
            cmp = _compare(moved, mine, heldout)
            adapted[method] = {m: cmp[m] for m in ("heldout_mean", "heldout_worst") if m in cmp}
        if adapted:
            out[entry]["adapted_vs_none"] = adapted
    return out


def ratio_to_centralized(
    mine: dict[str, Any], central: dict[str, Any] | None
) -> dict[str, float | None] | None:
    """Federated / pooled for in-distribution mean and held-out mean UAR."""
    if central is None:
        return None

    def ratio(key: str) -> float | None:
        x, y = mine.get(key), central.get(key)
        return None if x is None or not y else float(x) / float(y)

    return {"train_mean": ratio("mean_train_uar"), "heldout_mean": ratio("mean_heldout_uar")}


def summarize(sweep: Sweep) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary.json content, details for the report) from the finished runs.

    Per strategy and held-out source: UAR and WAR of the last round's global model on the source's
    test split, mean and (population) std over seeds. mean_heldout_uar / worst_heldout_uar: mean
    and min over held-out sources of those means. worst_train_uar / mean_train_uar: the worst
    training source's validation UAR / the training sources' mean validation UAR in each run's
    last round, averaged over that strategy's runs. vs_fedavg / vs_centralized: paired
    differences with 95 % paired-t intervals (`comparisons`); ratio_to_centralized: this
    strategy's over the pooled baseline's mean UARs. `selected`: the same numbers at each run's
    selected round (best.pt: the best worst training-source validation UAR), plus its rounds.
    """
    summary: dict[str, Any] = {}
    details: dict[str, Any] = {}
    values = {at: {s: run_values(sweep, s, at) for s in sweep.strategies} for at in AT}
    for strategy in sweep.strategies:
        runs = [r for r in sweep.runs if r.strategy == strategy and r.done]
        last = values["last"][strategy]
        held: dict[str, Any] = {}
        for h in sweep.heldout:
            xs = [v for (_, hh), v in last.items() if hh == h and "heldout" in v]
            if not xs:
                continue
            um, us = _mean_std([x["heldout"] for x in xs])
            wm, ws = _mean_std([x["heldout_war"] for x in xs])
            held[h] = {"uar_mean": um, "uar_std": us, "war_mean": wm, "war_std": ws}
        if not held:
            continue
        summary[strategy] = {"heldout": held, **aggregate(last, sweep.heldout)}
        selected = values["selected"][strategy]
        summary[strategy]["selected"] = {
            **aggregate(selected, sweep.heldout),
            "rounds": sorted(v["round"] for v in selected.values()),
        }
        train_by_source: dict[str, list[float]] = {}
        for v in last.values():
            for name, u in v.get("train_by_source", {}).items():
                train_by_source.setdefault(name, []).append(u)
        seconds = [
            float(json.loads((r.path / RUN_INFO).read_text()).get("wall_s", 0.0))
            for r in runs
            if (r.path / RUN_INFO).exists()
        ]
        adapted = summarize_adapted(runs)
        if adapted:
            summary[strategy]["adapted"] = adapted
        details[strategy] = {
            "runs": len(runs),
            "train_by_source": {k: float(np.mean(v)) for k, v in train_by_source.items()},
            "wall_seconds": float(np.sum(seconds)),
        }
    for at in AT:
        cmp = comparisons({s: values[at][s] for s in summary}, sweep.heldout, sweep.variants)
        for strategy, entry in summary.items():
            target = entry if at == "last" else entry["selected"]
            target.update(cmp.get(strategy, {}))
            other = baseline_of(strategy, CENTRALIZED, summary)
            central = summary.get(other) if other else None
            if central is not None:
                target["ratio_to_centralized"] = ratio_to_centralized(
                    target, central if at == "last" else central["selected"]
                )
    return summary, details


def summarize_adapted(runs: list[RunSpec]) -> dict[str, Any]:
    """{method: {"heldout": {source: {uar_mean, uar_std, war_mean, war_std}}, mean_heldout_uar,
    worst_heldout_uar}}: the held-out scores after test-time adaptation (`heldout_adapted` of
    each run's last row, `server.heldout_adapt`), aggregated as the plain ones are."""
    scores: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in runs:
        rows = _rows(r)
        for method, by_source in (rows[-1].get("heldout_adapted", {}) if rows else {}).items():
            if r.heldout in by_source:
                v = by_source[r.heldout]
                scores.setdefault(method, {}).setdefault(r.heldout, []).append((v["uar"], v["war"]))
    out: dict[str, Any] = {}
    for method, by_source in scores.items():
        held = {}
        for h, pairs in by_source.items():
            um, us = _mean_std([u for u, _ in pairs])
            wm, ws = _mean_std([w for _, w in pairs])
            held[h] = {"uar_mean": um, "uar_std": us, "war_mean": wm, "war_std": ws}
        means = [v["uar_mean"] for v in held.values()]
        out[method] = {
            "heldout": held,
            "mean_heldout_uar": float(np.mean(means)),
            "worst_heldout_uar": float(np.min(means)),
        }
    return out


# ---- plots and report ----------------------------------------------------------------------
def _first_done(sweep: Sweep, strategy: str) -> RunSpec | None:
    return next((r for r in sweep.runs if r.strategy == strategy and r.done), None)


def plot_lambda(run: RunSpec, path: Path) -> None:
    rows = _rows(run)
    names = sorted({n for row in rows for n in row.get("lambda", {})})
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for n in names:
        pts = [(row["round"], row["lambda"][n]) for row in rows if n in row.get("lambda", {})]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=n)
    ax.set_xlabel("round")
    ax.set_ylabel("lambda")
    ax.set_title(
        f"{run.strategy}: weight per source (held out: {run.heldout}, seed {run.seed})", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heldout_uar(sweep: Sweep, path: Path) -> None:
    """One panel per held-out source: its UAR over rounds, one line per strategy (seed mean)."""
    n = len(sweep.heldout)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    # one distinct colour per strategy (the default cycle repeats after 10)
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(sweep.strategies), 1)))
    for ax, h in zip(axes.flat, sweep.heldout, strict=False):
        for strategy, colour in zip(sweep.strategies, colours, strict=True):
            series: dict[int, list[float]] = {}
            for r in sweep.runs:
                if r.strategy == strategy and r.heldout == h and r.done:
                    for row in _rows(r):
                        if h in row.get("heldout", {}):
                            series.setdefault(row["round"], []).append(row["heldout"][h]["uar"])
            if series:
                xs = sorted(series)
                ys = [np.mean(series[x]) for x in xs]
                ax.plot(xs, ys, marker="o", ms=3, color=colour, label=strategy)
        ax.set_title(f"held out: {h}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("UAR")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    # one legend for all panels, beside them, so it hides no line
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


GOAL_POINTS = 3.0  # issue 5: DRO lifts both worst-source UARs by this much over FedAvg ...
GOAL_MEAN_DROP = 1.0  # ... without lowering the held-out mean by more than this


def _strategy_of(entry: str) -> str:
    """The strategy of a sweep entry ("dro@base" -> "dro")."""
    return entry.split("@", 1)[0]


def _fedavg_of(entry: str) -> str:
    """The FedAvg entry an entry is compared with: of the same variant ("dro@base" ->
    "fedavg@base")."""
    _, at, variant = entry.partition("@")
    return f"fedavg{at}{variant}"


def _against_fedavg(summary: dict[str, Any]) -> list[str]:
    """Report lines: each strategy's difference to FedAvg (of its own variant, if any) in UAR
    points, and the goal's verdict."""
    if not any(_strategy_of(k) == "fedavg" for k in summary) or len(summary) < 2:
        return []
    keys = ("worst_heldout_uar", "worst_train_uar", "mean_heldout_uar", "mean_train_uar")
    lines = [
        "",
        "## Against FedAvg (UAR points)",
        "",
        f"Goal: worst held-out and worst in-distribution each +{GOAL_POINTS:g} or more, held-out "
        f"mean down by at most {GOAL_MEAN_DROP:g}.",
        "",
        "| strategy | worst held-out | worst in-distribution | mean held-out | mean "
        "in-distribution | goal met |",
        "|---|---|---|---|---|---|",
    ]
    for strategy, s in summary.items():
        base = summary.get(_fedavg_of(strategy))
        if _strategy_of(strategy) == "fedavg" or base is None:
            continue
        if any(s.get(k) is None or base.get(k) is None for k in keys):
            continue
        d = {k: 100 * (s[k] - base[k]) for k in keys}
        met = (
            d["worst_heldout_uar"] >= GOAL_POINTS
            and d["worst_train_uar"] >= GOAL_POINTS
            and d["mean_heldout_uar"] >= -GOAL_MEAN_DROP
        )
        cells = " | ".join(f"{d[k]:+.1f}" for k in keys)
        lines.append(f"| {strategy} | {cells} | {'yes' if met else 'no'} |")
    return lines


METRIC_LABELS = {
    "heldout_mean": "held-out mean",
    "heldout_worst": "held-out worst",
    "train_mean": "in-distribution mean",
    "train_worst": "in-distribution worst",
}


def _cell(c: dict[str, Any] | None) -> str:
    """One paired difference in UAR points: diff [lo, hi] (n), and what the interval says."""
    if not c:
        return "-"
    p = PairedDiff(**c)
    if p.lo is None or p.hi is None:
        return f"{100 * p.diff:+.1f} (n={p.n}, too few pairs)"
    return f"{100 * p.diff:+.1f} [{100 * p.lo:+.1f}, {100 * p.hi:+.1f}] (n={p.n}) {verdict(p)}"


def _comparison_lines(summary: dict[str, Any], at: str) -> list[str]:
    """Tables of paired differences against FedAvg and the pooled baseline, and the ratios."""

    def entry(s: dict[str, Any]) -> dict[str, Any]:
        return s if at == "last" else s["selected"]

    where = "last round" if at == "last" else "selected round (best.pt)"
    lines: list[str] = []
    for key, base in BASELINES.items():
        rows = [(name, entry(s)[key]) for name, s in summary.items() if key in entry(s)]
        if not rows:
            continue
        lines += [
            "",
            f"## Against {base}, {where}: paired difference in UAR points, 95 % CI",
            "",
            "Paired t over (seed, held-out source) pairs (held-out worst: over seeds); the "
            "verdict reads the interval: better / worse when it excludes 0.",
            "",
            "| strategy | " + " | ".join(METRIC_LABELS.values()) + " |",
            "|---" * (len(METRIC_LABELS) + 1) + "|",
        ]
        for name, cmp in rows:
            lines.append(f"| {name} | " + " | ".join(_cell(cmp.get(m)) for m in METRICS) + " |")
    variant_rows = [(name, entry(s)["vs_variant"]) for name, s in summary.items()
                    if "vs_variant" in entry(s)]  # fmt: skip
    if variant_rows:
        lines += [
            "",
            f"## Against the same strategy under the first variant, {where}: UAR points, 95 % CI",
            "",
            "| entry | against | " + " | ".join(METRIC_LABELS.values()) + " |",
            "|---" * (len(METRIC_LABELS) + 2) + "|",
        ]
        for name, cmp in variant_rows:
            cells = " | ".join(_cell(cmp.get(m)) for m in METRICS)
            lines.append(f"| {name} | {cmp['against']} | {cells} |")
    adapted_rows = [(name, method, cmp) for name, s in summary.items()
                    for method, cmp in entry(s).get("adapted_vs_none", {}).items()]  # fmt: skip
    if adapted_rows:
        lines += [
            "",
            f"## Test-time adaptation against none, {where}: held-out UAR points, 95 % CI",
            "",
            "Same runs, same held-out clips, scored after and before adapting on them unlabeled.",
            "",
            "| strategy | adaptation | held-out mean | held-out worst |",
            "|---|---|---|---|",
        ]
        for name, method, cmp in adapted_rows:
            cells = " | ".join(_cell(cmp.get(m)) for m in ("heldout_mean", "heldout_worst"))
            lines.append(f"| {name} | {method} | {cells} |")
    ratios = [
        (name, entry(s)["ratio_to_centralized"])
        for name, s in summary.items()
        if entry(s).get("ratio_to_centralized")
    ]
    if ratios:
        lines += [
            "",
            f"## Federated / centralized, {where}",
            "",
            "| strategy | in-distribution mean | held-out mean |",
            "|---|---|---|",
        ]
        for name, r in ratios:
            cells = ["-" if r[k] is None else f"{r[k]:.2f}" for k in ("train_mean", "heldout_mean")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _selected_lines(summary: dict[str, Any]) -> list[str]:
    """Last-round against selected-round (best.pt) means, per strategy."""
    keys = ("mean_heldout_uar", "worst_heldout_uar", "mean_train_uar", "worst_train_uar")
    lines = [
        "",
        "## Last round and selected round (best.pt)",
        "",
        "Each run's selected round has the best worst training-source validation UAR; held-out "
        "sources take no part in the choice. UAR in %, last / selected.",
        "",
        "| strategy | mean held-out | worst held-out | mean in-distribution | worst "
        "in-distribution | selected rounds |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        cells = [f"{_pct(s[k])} / {_pct(s['selected'][k])}" for k in keys]
        rounds = ", ".join(str(r) for r in s["selected"]["rounds"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rounds} |")
    return lines


def _adapted_lines(heldout: list[str], summary: dict[str, Any]) -> list[str]:
    """Report lines: held-out UAR with and without test-time adaptation, per strategy."""
    if not any(s.get("adapted") for s in summary.values()):
        return []
    lines = [
        "",
        "## Held-out sources after test-time adaptation",
        "",
        "Each held-out source scored after adapting the last round's model on its own unlabeled "
        "test clips (`server.heldout_adapt`; `none` is the plain score above). UAR in %, mean ± "
        "std over seeds; the last column is the worst held-out UAR minus that of `none`, in "
        "points.",
        "",
        "| strategy | adaptation | "
        + " | ".join(heldout)
        + " | mean UAR | worst UAR | worst vs none |",
        "|---" * (len(heldout) + 5) + "|",
    ]
    for strategy, s in summary.items():
        if not s.get("adapted"):
            continue
        for method, a in [("none", s), *s["adapted"].items()]:
            cells = [
                "-" if h not in a["heldout"] else
                f"{_pct(a['heldout'][h]['uar_mean'])} ± {_pct(a['heldout'][h]['uar_std'])}"
                for h in heldout
            ]  # fmt: skip
            gain = 100 * (a["worst_heldout_uar"] - s["worst_heldout_uar"])
            lines.append(
                f"| {strategy} | {method} | " + " | ".join(cells) + f" | "
                f"{_pct(a['mean_heldout_uar'])} | {_pct(a['worst_heldout_uar'])} | {gain:+.1f} |"
            )
    return lines


def write_report(sweep: Sweep) -> Path:
    """report.md, plots and summary.json in the sweep folder; returns the report's path."""
    from server.report import plot_confusion

    summary, details = summarize(sweep)
    (sweep.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    done = sum(r.done for r in sweep.runs)
    lines = [
        f"# Leave-one-source-out report: {sweep.path.name}",
        "",
        f"Overrides: `{' '.join(sweep.base) or '(defaults)'}`; strategies {sweep.strategies}; "
        f"seeds {sweep.seeds}; held-out sources {sweep.heldout}; {done}/{len(sweep.runs)} runs "
        "done.",
        "",
        "Numbers are UAR / WAR in % of the last round's model, mean ± std over seeds. Held-out: "
        "the held-out source's test split. In-distribution: each training source's validation "
        "split; worst = the worst training source of each run, averaged over runs.",
        "",
        "## Held-out sources",
        "",
        "| strategy | " + " | ".join(sweep.heldout) + " | mean UAR | worst UAR |",
        "|---" * (len(sweep.heldout) + 3) + "|",
    ]
    for strategy in sweep.strategies:
        if strategy not in summary:
            lines.append(f"| {strategy} | " + " | ".join("-" for _ in sweep.heldout) + " | - | - |")
            continue
        s = summary[strategy]
        cells = []
        for h in sweep.heldout:
            v = s["heldout"].get(h)
            cells.append(
                "-"
                if v is None
                else f"{_pct(v['uar_mean'])} ± {_pct(v['uar_std'])} / "
                f"{_pct(v['war_mean'])} ± {_pct(v['war_std'])}"
            )
        lines.append(
            f"| {strategy} | " + " | ".join(cells) + f" | {_pct(s['mean_heldout_uar'])} "
            f"| {_pct(s['worst_heldout_uar'])} |"
        )
    sources = sorted({n for d in details.values() for n in d["train_by_source"]})
    lines += [
        "",
        "## In-distribution (validation UAR of training sources)",
        "",
        "| strategy | " + " | ".join(sources) + " | mean | worst | runs | wall time (s) |",
        "|---" * (len(sources) + 5) + "|",
    ]
    for strategy, d in details.items():
        cells = [_pct(d["train_by_source"].get(n)) for n in sources]
        lines.append(
            f"| {strategy} | "
            + " | ".join(cells)
            + f" | {_pct(summary[strategy]['mean_train_uar'])}"
            f" | {_pct(summary[strategy]['worst_train_uar'])} | {d['runs']} | "
            f"{d['wall_seconds']:.0f} |"
        )
    lines += _against_fedavg(summary)
    lines += _comparison_lines(summary, "last")
    lines += _selected_lines(summary)
    lines += _comparison_lines(summary, "selected")
    lines += _adapted_lines(sweep.heldout, summary)
    failed = [r for r in sweep.runs if not r.done]
    if failed:
        lines += ["", "## Runs not finished", ""]
        lines += [
            f"- {r.strategy}, held out {r.heldout}, seed {r.seed}: `{r.path}`" for r in failed
        ]
    lines += ["", "## Plots", ""]
    if done:
        plot_heldout_uar(sweep, sweep.path / "heldout_uar.png")
        lines += ["![held-out UAR over rounds](heldout_uar.png)", ""]
    for strategy in sweep.strategies:
        run = _first_done(sweep, strategy)
        no_lambda = (CENTRALIZED, "fedavg", "fedprox", "fedbn", "local")
        if run is None or _strategy_of(strategy) in no_lambda:
            continue
        png = f"lambda_{strategy}.png"
        plot_lambda(run, sweep.path / png)
        lines += [f"![lambda {strategy}]({png})", ""]
    for strategy in sweep.strategies:
        for h in sweep.heldout:
            cms = [
                np.asarray(row["heldout"][h]["confusion"])
                for r in sweep.runs
                if r.strategy == strategy and r.heldout == h and r.done
                for row in _rows(r)[-1:]
                if row.get("heldout", {}).get(h, {}).get("confusion") is not None
            ]
            if cms:
                png = f"confusion_{strategy}_{h}.png"
                plot_confusion(
                    np.sum(cms, axis=0).tolist(),
                    f"{strategy}, held out {h} (summed over seeds)",
                    sweep.path / png,
                )
                lines += [f"![confusion {strategy} {h}]({png})", ""]
    path = sweep.path / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


@command
def main(argv: list[str] | None = None, launcher: Callable[[RunSpec], int] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2], argv[3:])
    sweep = plan(argv)
    run_sweep(sweep, launcher or launch_subprocess)
    write_report(sweep)
    failed = sum(not r.done for r in sweep.runs)
    if failed:
        print(f"{failed} run(s) did not finish; the report covers the rest", flush=True)
    print(sweep.path.resolve(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
