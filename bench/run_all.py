"""Every benchmark of issue 7, one JSON object each, all of them in bench/results.json.

    python -m bench.run_all                      # make bench
    python -m bench.run_all --only aggregation   # some of them (results.json keeps the others)
    python -m bench.run_all --quick              # smaller sizes, for a smoke check

Top-level keys of results.json: federation_overhead, aggregation, train_step, scale,
synthetic_data, gpu, deployment; each holds its figures and, where there is one, the headline
ratio under ``ratio``. This machine is shared and noisy, so every figure is a ratio of variants
measured in the same run, interleaved where they run in one process (absolute seconds are given
for context only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.flower_env import FLOWER_ENV

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
NAMES = (
    "federation_overhead",
    "aggregation",
    "train_step",
    "scale",
    "synthetic_data",
    "gpu",
    "deployment",
)
GIB = 2**30

ENV = {**FLOWER_ENV, "WANDB_MODE": "disabled"}


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in:\n{text[-2000:]}")


def _run(cmd: list[str], *, memory: bool = False, timeout: float = 3600) -> dict[str, Any]:
    """Run `cmd` in the repo root; wall seconds, stdout, and the tree's peak PSS if asked."""
    from testbed.proctree import TreeMemory

    env = {**os.environ, **ENV}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if memory:
        with TreeMemory(proc.pid) as mem:
            out, err = proc.communicate(timeout=timeout)
    else:
        mem = None
        out, err = proc.communicate(timeout=timeout)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{err[-3000:]}")
    res: dict[str, Any] = {"wall_s": wall, "stdout": out}
    if mem is not None:
        res["peak_pss_gib"] = mem.peak_bytes / GIB
        res["peak_processes"] = mem.peak_processes
    return res


# ---- data configs -----------------------------------------------------------------------------
def source_overrides(k: int, scale: float, root: Path) -> list[str]:
    """Overrides for `k` distinct synthetic training sources, none held out.

    The synthetic benchmark has 6 presets and refuses a name twice, so beyond 6 the sources come
    from the `multi` dataset over copies of the synthetic benchmark with different seeds
    (`s0/studio`, `s1/studio`, ...): distinct clips, the same 6 styles.
    """
    if k <= 6:
        from hdf.data.synthetic import DEFAULT_SOURCES

        names = ",".join(list(DEFAULT_SOURCES)[:k])
        return [
            f"data.sources=[{names}]",
            "data.heldout=[]",
            f"data.scale={scale}",
            f"data.root={root}",
        ]
    copies = -(-k // 6)
    entries = ",".join(
        f"s{i}:{{name:synthetic,seed:{i},scale:{scale},root:'{root}'}}" for i in range(copies)
    )
    from hdf.data.synthetic import DEFAULT_SOURCES

    names = [f"s{i}/{n}" for i in range(copies) for n in DEFAULT_SOURCES][:k]
    return [
        "data=multi",
        "~data.datasets",
        f"+data.datasets={{{entries}}}",
        f"data.sources=[{','.join(names)}]",
        "data.heldout=[]",
        "data.num_frames=8",
        "data.size=48",
    ]


def warm_data(overrides: list[str]) -> float:
    """Generate (or load) every split once, so no timed run pays for data generation."""
    t0 = time.monotonic()
    _run(
        [
            sys.executable,
            "-c",
            (
                "import sys\nfrom hdf.data import build_sources\n"
                "from hdf.config import compose\n"
                "cfg = compose(sys.argv[1:])\n"
                "for s in build_sources(cfg.data):\n"
                "    [s.split(x) for x in ('train', 'val', 'test')]\n"
            ),
            *overrides,
        ]
    )
    return time.monotonic() - t0


def _metrics_rows(stdout: str) -> list[dict[str, Any]]:
    run_dir = Path(stdout.strip().splitlines()[-1])
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def simulate(overrides: list[str], out: Path, memory: bool = False) -> dict[str, Any]:
    res = _run(
        [
            sys.executable,
            "-m",
            "simulations.run",
            *overrides,
            f"output.root={out}",
            "output.wandb=disabled",
        ],
        memory=memory,
    )
    rows = _metrics_rows(res.pop("stdout"))
    res["round_s"] = [round(float(r["seconds"]), 3) for r in rows]
    return res


def baseline(overrides: list[str], with_eval: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.local_baseline", *(["--with-eval"] if with_eval else [])]
    res = _run([*cmd, *overrides])
    res.update(_last_json(res.pop("stdout")))
    return res


# ---- 1. federation overhead -------------------------------------------------------------------
def federation_overhead(quick: bool, tmp: Path) -> dict[str, Any]:
    """Simulation wall / wall of the same local training in one pool of processes (no Flower)."""
    root = tmp / "data"
    rounds = 2
    # The goal is about the default run itself (80 rounds x 0.5 epochs, ~5 min): its fixed start-up
    # (Ray, workers, discovery) is spread over all its rounds. --quick takes 2 small rounds, where
    # start-up dominates; the K and width cases below are 2-round probes of how the ratio moves.
    default = (
        [f"rounds={rounds}", "data.scale=0.25", f"data.root={root}"]
        if quick
        else [f"data.root={root}"]
    )
    cases: list[tuple[str, list[str]]] = [("default", default)]
    ks = (3, 6) if quick else (3, 6, 12, 24)
    for k in ks:
        cases.append((f"K={k}", [f"rounds={rounds}", *source_overrides(k, 0.1, root)]))
    for w in (8, 16, 32):
        cases.append(
            (
                f"width={w}",
                [f"rounds={rounds}", f"model.width={w}", *source_overrides(3, 0.1, root)],
            )
        )
    out: dict[str, Any] = {
        "method": (
            "wall of `python -m simulations.run` (the default run; the other cases "
            f"{rounds} rounds) / wall of "
            "`python -m bench.local_baseline` (the same train_local calls, same threads per "
            "client, a pool of cpu_count/num_cpus_per_client processes, no Flower); "
            "`with_eval` adds the loss-before sample and the validation pass to the baseline, "
            "so ratio_vs_compute isolates the federation machinery"
        ),
        "cases": {},
    }
    for name, ov in cases:
        warm = warm_data(ov)
        sim = simulate(ov, tmp / "runs")
        base = baseline(ov)
        base_eval = baseline(ov, with_eval=True)
        out["cases"][name] = {
            "overrides": [o for o in ov if "root" not in o],
            "ratio": round(sim["wall_s"] / base["wall_s"], 3),
            "ratio_vs_compute": round(sim["wall_s"] / base_eval["wall_s"], 3),
            "sim_wall_s": round(sim["wall_s"], 1),
            "sim_round_s": sim["round_s"],
            "local_wall_s": round(base["wall_s"], 1),
            "local_with_eval_wall_s": round(base_eval["wall_s"], 1),
            "data_warmup_s": round(warm, 1),
        }
        print(json.dumps({"case": name, **out["cases"][name]}), file=sys.stderr, flush=True)
    out["ratio"] = out["cases"]["default"]["ratio"]
    out["goal"] = "ratio <= 1.15 for the default run"
    return out


# ---- 2. aggregation ---------------------------------------------------------------------------
def aggregation(quick: bool, tmp: Path) -> dict[str, Any]:
    """DRO.aggregate_train vs Flower's FedAvg.aggregate_train on the same replies (r3d_18 size)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from hdf.config import compose, model_settings
    from hdf.models import build_model
    from server.strategy.base import weighted_average
    from server.strategy.dro import DRO
    from server.validation import validate_train_replies
    from tests.fedmock import train_reply

    cfg = compose(["model=r3d_18", "data.num_frames=16", "data.size=112"])
    state = build_model(model_settings(cfg.model), 16, 112).state_dict()
    params = sum(v.numel() for v in state.values())
    rng = np.random.default_rng(0)
    base = {k: v.numpy() for k, v in state.items()}
    distinct = 4  # replies cycle over 4 distinct updates: 50 copies of 130 MB would not fit
    updates = []
    for _ in range(distinct):
        upd = {}
        for k, v in base.items():
            if np.issubdtype(v.dtype, np.floating):
                upd[k] = (v + rng.standard_normal(v.shape, dtype=np.float32) * 1e-3).astype(v.dtype)
            else:
                upd[k] = v.copy()
        updates.append({k: Array(np.asarray(v)) for k, v in upd.items()})
    current = ArrayRecord({k: Array(np.asarray(v)) for k, v in base.items()})
    out: dict[str, Any] = {"parameters": int(params), "arrays": len(base), "cases": {}}
    repeats = 2 if quick else 3
    for k in (10,) if quick else (10, 50):
        replies = []
        for i in range(k):
            msg = train_reply(i + 1, {}, source=i, loss_before=1.0 + 0.01 * i, num_examples=10 + i)
            msg.content["arrays"] = ArrayRecord(dict(updates[i % distinct]))
            replies.append(msg)
        times: dict[str, list[float]] = {"dro": [], "flower_fedavg": []}
        for _ in range(repeats):  # interleaved
            dro = DRO(train_sources=list(range(k)), source_names={i: str(i) for i in range(k)})
            for i in range(k):
                dro.register_node(i + 1, i, False)
            dro.current_arrays = current
            t0 = time.perf_counter()
            arrays, _ = dro.aggregate_train(1, replies)
            times["dro"].append(time.perf_counter() - t0)
            assert arrays is not None
            fed = FedAvg()
            t0 = time.perf_counter()
            fed.aggregate_train(1, replies)
            times["flower_fedavg"].append(time.perf_counter() - t0)
        best = {n: min(v) for n, v in times.items()}
        # where DRO's time goes: update validation (server/validation.py) vs the weighted mix
        t0 = time.perf_counter()
        validate_train_replies(replies, current, set(range(k)), dro.node_source)
        best["dro_validation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        weighted_average([m.content["arrays"] for m in replies], [1.0] * k)
        best["dro_weighted_average"] = time.perf_counter() - t0
        out["cases"][f"K={k}"] = {
            "ratio": round(best["dro"] / best["flower_fedavg"], 3),
            "seconds": {n: round(v, 3) for n, v in best.items()},
        }
        del replies
    out["ratio"] = max(c["ratio"] for c in out["cases"].values())
    out["goal"] = "ratio <= 1 (DRO, update validation included, no slower than Flower's FedAvg)"
    return out


# ---- 3. train step and loader -----------------------------------------------------------------
def train_step(quick: bool, tmp: Path) -> dict[str, Any]:
    steps, repeats = ("3", "2") if quick else ("6", "3")
    res = _run(
        [sys.executable, "-m", "bench.bench_train_step", "--steps", steps, "--repeats", repeats]
    )
    step = _last_json(res["stdout"])
    loader = _run([sys.executable, "-m", "bench.bench_loader", "--repeats", repeats])
    load = _last_json(loader["stdout"])
    return {
        "ratio": load["ratio"],
        "ratio_meaning": "data loader clips/s over the default training step's clips/s (>= 3)",
        "ratio_to_base": step["ratio_to_base"],
        "seconds_per_step": step["seconds_per_step"],
        "loader": load,
        "goals": step["goals"],
    }


# ---- 4. scale ---------------------------------------------------------------------------------
def scale(quick: bool, tmp: Path) -> dict[str, Any]:
    """Largest K that runs with the tiny model, peak PSS of the process tree, round time per K."""
    root = tmp / "data-tiny"
    ks = (6, 24) if quick else (6, 24, 50, 100)
    out: dict[str, Any] = {"cases": {}, "model": "experiment=tiny (tiny3d width 4, T=4, 32x32)"}
    largest = 0
    for k in ks:
        ov = [
            "experiment=tiny",
            "rounds=1",
            *source_overrides(k, 0.08, root),
            "data.num_frames=4",
            "data.size=32",
        ]
        try:
            warm = warm_data(ov)
            sim = simulate(ov, tmp / "runs", memory=True)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            out["cases"][f"K={k}"] = {"failed": str(err)[-500:]}
            break
        largest = k
        round_s = sim["round_s"][-1]
        out["cases"][f"K={k}"] = {
            "peak_pss_gib": round(sim["peak_pss_gib"], 2),
            "peak_processes": sim["peak_processes"],
            "peak_pss_per_source_gib": round(sim["peak_pss_gib"] / k, 3),
            "round_s": round_s,
            "round_s_per_source": round(round_s / k, 3),
            "wall_s": round(sim["wall_s"], 1),
            "data_warmup_s": round(warm, 1),
        }
        print(json.dumps({"case": k, **out["cases"][f"K={k}"]}), file=sys.stderr, flush=True)
    out["largest_k"] = largest
    first, last = out["cases"].get(f"K={ks[0]}"), out["cases"].get(f"K={largest}")
    if first and last and "round_s" in first and largest != ks[0]:
        out["ratio"] = round(last["round_s_per_source"] / first["round_s_per_source"], 3)
        out["ratio_meaning"] = f"round seconds per source at K={largest} over K={ks[0]}"
    out["goal"] = "100 sources in one simulation"
    return out


# ---- 5. synthetic data ------------------------------------------------------------------------
def synthetic_data(quick: bool, tmp: Path) -> dict[str, Any]:
    res = _run(
        [sys.executable, "-m", "bench.bench_synthetic", "--scale", "0.05" if quick else "0.25"]
    )
    return _last_json(res["stdout"])


# ---- 6. GPU -----------------------------------------------------------------------------------
def gpu(quick: bool, tmp: Path) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    res = _run([sys.executable, "-m", "bench.gpu_check"], timeout=600)
    return _last_json(res["stdout"])


# ---- 7. deployment ----------------------------------------------------------------------------
DEPLOYMENT_KEYS = (
    "sites",
    "deployed_round_s",
    "simulated_round_s",
    "overhead_s",
    "superlink_requests_per_round",
    "bytes_per_round",
    "cpu_s_per_round",
)


def deployment(quick: bool, tmp: Path) -> dict[str, Any]:
    """A deployed round (3 sites in network namespaces, TLS) against a simulated one
    (bench/bench_deploy.py): deploy_tiny with 3 sites (and 1 alone, under `one_site`), and the
    same for an r3d_18-size model with fewer rounds (2: with 1, the final evaluation exchange
    would be half of the one round measured). `warm_worker`: the 3 sites again, each with its
    warm worker (`deploy/supernode.sh --warm-worker`); for r3d_18 also with a bf16 wire
    (`warm_worker_bf16`), the fastest setup the deployment scripts give, and that again with
    the SuperLink's state in memory (`warm_worker_bf16_memory_db`: a restarted SuperLink then
    forgets the registered sites, docs/deploy.md). The sites run `hdf-supernode`
    (`supernode_poll`: its waits); `flower_poll`: deploy_tiny's 3 sites with Flower's fixed
    SuperNode waits instead, what the brisker poll saves."""
    out: dict[str, Any] = {}
    r3d_rounds = 1 if quick else 2
    for model, rounds, sites in (("tiny", 1 if quick else 3, "3,1"), ("r3d_18", r3d_rounds, "3,1")):
        cmd = [sys.executable, "-m", "bench.bench_deploy", "--model", model]
        cmd += ["--rounds", str(rounds)]
        res = _last_json(_run([*cmd, "--sites", sites])["stdout"])
        three = res["sites_3"]
        if "deployed" in three:  # skipped: no network namespaces here
            return {"skipped": three["deployed"]["skipped"]}
        entry = {k: three[k] for k in DEPLOYMENT_KEYS}
        entry.update(rounds=three["rounds"], model_bytes_fp32=res["model_bytes_fp32"])
        entry.update(uptime_start=res["uptime_start"], uptime_end=res["uptime_end"])
        if "sites_1" in res:
            entry["one_site"] = {k: res["sites_1"][k] for k in DEPLOYMENT_KEYS}
        entry["supernode_poll"] = res["supernode_poll"]
        variants = [("warm_worker", ["--warm-worker"])]
        if model == "tiny":  # the same 3 sites with Flower's fixed SuperNode waits
            variants.append(("flower_poll", ["--flower-poll"]))
        else:
            bf16 = "server.wire_dtype=bfloat16"
            variants.append(("warm_worker_bf16", ["--warm-worker", bf16]))
            variants.append(("warm_worker_bf16_memory_db", ["--warm-worker", "--memory-db", bf16]))
        for key, flags in variants:
            res = _last_json(_run([*cmd, "--sites", "3", *flags])["stdout"])
            entry[key] = {k: res["sites_3"][k] for k in DEPLOYMENT_KEYS}
            entry[key].update(uptime_start=res["uptime_start"], uptime_end=res["uptime_end"])
        if model == "tiny":
            out.update(entry)
        else:
            out["r3d_18"] = entry
    return out


BENCHES = {
    "federation_overhead": federation_overhead,
    "aggregation": aggregation,
    "train_step": train_step,
    "scale": scale,
    "synthetic_data": synthetic_data,
    "gpu": gpu,
    "deployment": deployment,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(NAMES))
    p.add_argument("--quick", action="store_true", help="smaller sizes (smoke check)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    only = [n for n in args.only.split(",") if n] or list(NAMES)
    unknown = set(only) - set(NAMES)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(NAMES)}")
    results: dict[str, Any] = {}
    if args.out.exists():
        results = {k: v for k, v in json.loads(args.out.read_text()).items() if k in NAMES}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name in NAMES:
            if name not in only:
                continue
            t0 = time.monotonic()
            try:
                res = BENCHES[name](args.quick, Path(tmp))
            except Exception as err:  # one failing benchmark must not lose the others
                res = {"error": f"{type(err).__name__}: {err}"[-2000:]}
            res["bench_wall_s"] = round(time.monotonic() - t0, 1)
            res["load_avg_1m"] = round(os.getloadavg()[0], 2)
            results[name] = res
            print(json.dumps({"benchmark": name, **res}), flush=True)
            args.out.write_text(
                json.dumps({k: results.get(k, {"skipped": "not run"}) for k in NAMES}, indent=2)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
