"""Deployment vs simulation for the same small config, and bytes per client per round (issue 6).

Usage: ``python -m bench.bench_deploy [--rounds 2] [overrides...]``

Runs `experiment=deploy_tiny` (three training sources; the held-out source scored by the server
in both, so the two runs do the same work) twice:
- in simulation (`python -m simulations.run`, Flower's Ray engine, one process);
- deployed: a SuperLink and one SuperNode per source, each in its own Linux network namespace,
  TLS and SuperNode authentication on (testbed/cluster.py), launched with `flwr run . hdf`;
and prints one JSON object: mean wall seconds per round (rounds >= 1, from each run's
metrics.jsonl; round 0 also pays start-up and data generation), whole-run wall seconds, the
deployment/simulation ratio, and the bytes one client receives and sends per round (the model's
arrays as the ArrayRecord carries them, fp32, and what a 16-bit transfer would carry).
The deployed half needs root and `ip` (network namespaces); without them it is skipped and the
reason is printed in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.flower_env import apply_flower_env

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["studio", "webcam", "movie"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def _round_seconds(run_dir: Path) -> list[float]:
    return [float(r["seconds"]) for r in _rows(run_dir) if r["round"] >= 1]


def _lambda_gap(a: Path, b: Path) -> float:
    """Largest |lambda_sim - lambda_deploy| over rounds and sources (same seed, same config)."""
    return max(
        abs(ra["lambda"][k] - rb["lambda"][k])
        for ra, rb in zip(_rows(a), _rows(b), strict=True)
        for k in ra["lambda"]
    )


def model_bytes(overrides: list[str]) -> dict[str, int]:
    """Bytes of the model's arrays: one train round moves them down and up once per client."""
    from flwr.app import ArrayRecord

    from hdf.config import compose, model_settings
    from hdf.models import build_model

    cfg = compose(overrides)
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    record = ArrayRecord(model.state_dict())
    total = sum(len(a.data) for a in record.values())
    floats = sum(len(a.data) for a in record.values() if a.dtype.startswith("float"))
    params = sum(p.numel() for p in model.parameters())
    return {
        "parameters": int(params),
        "arrays": len(record),
        "bytes_per_model_fp32": int(total),
        # train: model down + update up; evaluate: model down again
        "bytes_per_client_per_round": int(3 * total),
        "bytes_per_client_per_round_fp16": int(3 * (total - floats // 2)),
    }


def run_simulation(overrides: list[str], out: Path) -> dict[str, Any]:
    env = {**os.environ, "WANDB_MODE": "disabled", "FLWR_HOME": str(out / "flwr-home")}
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "simulations.run", *overrides, f"output.root={out / 'runs'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"simulation failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    secs = _round_seconds(run_dir)
    return {"round_s": statistics.mean(secs), "rounds": len(secs), "wall_s": wall, "dir": run_dir}


def run_deployment(overrides: list[str], out: Path) -> dict[str, Any]:
    from testbed.cluster import Cluster

    t0 = time.monotonic()
    # the sites read the clips the simulation generated (same seed, same clips)
    with Cluster(out / "cluster", SOURCES, shared_data=out / "data") as c:
        c.start_superlink()
        for s in SOURCES:
            c.register(s)
            c.start_site(s)
        c.wait_for(lambda: c.online() == len(SOURCES), 120, "sites online")
        up = time.monotonic() - t0
        run_dir = out / "deploy-run"
        t1 = time.monotonic()
        run_id = c.submit(" ".join(overrides), run_dir)
        status = c.wait_run(run_id, 1800)
        wall = time.monotonic() - t1
        if status != "finished:completed":
            raise RuntimeError(f"deployed run {status}:\n{c.log(run_id)[-3000:]}")
    secs = _round_seconds(run_dir)
    return {
        "round_s": statistics.mean(secs),
        "rounds": len(secs),
        "wall_s": wall,
        "startup_s": up,
        "dir": run_dir,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    apply_flower_env()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        out = Path(tmp)
        overrides = [
            "experiment=deploy_tiny",
            f"data.sources=[{','.join(SOURCES)}]",
            "data.heldout=[]",
            "server.heldout_eval=server",
            f"rounds={args.rounds}",
            f"data.root={out / 'data'}",
            "+train.threads=1",
            *args.overrides,
        ]
        result: dict[str, object] = {
            "config": [o for o in overrides if not o.startswith("data.root=")],
            "cpus": os.cpu_count(),
            "load_avg_1m_at_start": os.getloadavg()[0],
            **model_bytes(overrides),
        }
        result["simulation"] = run_simulation(overrides, out)
        from testbed.cluster import why_no_netns

        reason = why_no_netns()
        if reason:
            result["deployment"] = {"skipped": reason}
            del result["simulation"]["dir"]
        else:
            result["deployment"] = dep = run_deployment(overrides, out)
            sim = result["simulation"]
            result["round_time_ratio_deploy_over_sim"] = dep["round_s"] / sim["round_s"]
            result["lambda_max_abs_diff_deploy_vs_sim"] = _lambda_gap(sim["dir"], dep["dir"])
            del sim["dir"], dep["dir"]
        result["fp16_transfer"] = (
            "not implemented: casting arrays to 16 bits on the wire touches the message contract "
            "in client/app.py and server/ (owned by the lead); bytes_per_client_per_round_fp16 "
            "is the size it would carry"
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
