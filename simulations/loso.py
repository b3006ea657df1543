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
its checkpoint. Neither name covers the code, so each run's loso.json records it (`git describe`)
and a re-run warns about finished runs that other code made (they are reused as they are). The
sweep folder gets report.md, plots and summary.json (`simulations.loso_report`,
`simulations.loso_summary`); its path is the last line printed.

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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from hdf.config import compose
from hdf.config.preflight import check_config, check_data
from hdf.config.schema import LosoConfig
from hdf.runfolder.folder import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE
from simulations.cli import command
from simulations.loso_report import write_report
from simulations.loso_runs import CENTRALIZED, LOG_FILE, RUN_INFO, RunSpec, Sweep
from simulations.ray_cluster import given_address

# The sweep's settings and their defaults: hdf/config/schema.py LosoConfig.
LOSO_DEFAULTS: dict[str, Any] = asdict(LosoConfig())


def _hash(items: Sequence[str], n: int = 10) -> str:
    return hashlib.sha1(json.dumps(list(items)).encode()).hexdigest()[:n]


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
    from hdf.runfolder.folder import RunFolder
    from server.app import open_run, resolve_resume

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


CODE_ROOT = Path(__file__).resolve().parents[1]


def code_version(root: Path = CODE_ROOT) -> str:
    """The commit the sweep's code is at (`git describe --always --dirty`), or "unknown" outside
    a git checkout: recorded in every run's loso.json, since a re-run reuses finished runs."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def other_code(runs: Sequence[RunSpec], code: str) -> dict[str, int]:
    """Finished runs whose loso.json names code other than `code`: {version: runs}. A sweep
    folder is named by its overrides, not by the code, so these are reused as they are."""
    seen: dict[str, int] = {}
    for run in runs:
        if not run.done:
            continue
        try:
            got = str(json.loads((run.path / RUN_INFO).read_text()).get("code", "unknown"))
        except (OSError, ValueError, AttributeError):
            got = "unknown"
        if got != code:
            seen[got] = seen.get(got, 0) + 1
    return seen


def run_sweep(sweep: Sweep, launcher: Callable[[RunSpec], int] = launch_subprocess) -> None:
    sweep.path.mkdir(parents=True, exist_ok=True)
    code = code_version()
    stale = other_code(sweep.runs, code)
    if stale:
        which = ", ".join(f"{n} at {v}" for v, n in sorted(stale.items()))
        print(
            f"warning: {sum(stale.values())} finished runs of this sweep were made by other code "
            f"({which}; this is {code}) and are reused as they are; to run them again with this "
            "code, delete their folders or give a new loso.root",
            flush=True,
        )
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
            "code": code,
        }
        (run.path / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")

    # Threads only wait on child processes; each run has its own process, Ray and folder.
    with ThreadPoolExecutor(max_workers=sweep.jobs) as pool:
        for f in [pool.submit(one, i, run) for i, run in enumerate(todo, 1)]:
            f.result()


@command
def main(argv: list[str] | None = None, launcher: Callable[[RunSpec], int] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2], argv[3:])
    sweep = plan(argv)
    run_sweep(sweep, launcher or launch_subprocess)
    write_report(sweep.with_found_entries())
    failed = sum(not r.done for r in sweep.runs)
    if failed:
        print(f"{failed} run(s) did not finish; the report covers the rest", flush=True)
    print(sweep.path.resolve(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
