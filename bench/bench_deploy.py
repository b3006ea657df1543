"""A deployed round against a simulated one, with where the time, CPU, requests and bytes go.

Usage: ``python -m bench.bench_deploy [--rounds 3] [--model tiny|r3d_18] [--sites 3,1]
[--warm-worker] [--memory-db] [--flower-poll] [--keep] [overrides...]``

For `experiment=deploy_tiny` (the held-out source scored by the server in both, so the two runs
do the same work) and each site count in `--sites` (3: studio, webcam, movie; 1: studio alone,
which separates what one site costs from the contention of three on one box) it runs:
- a simulation (`python -m simulations.run`, Flower's Ray engine, one process);
- a deployment: a SuperLink and one SuperNode per source, each in its own network namespace,
  TLS and SuperNode authentication on (testbed/cluster.py), launched with `flwr run . hdf`;
  `--warm-worker` starts each site with its warm worker (`deploy/supernode.sh --warm-worker`,
  client/worker.py), which then runs the messages the ClientApps forward to it. The SuperNodes
  are `hdf-supernode` (deploy/supernode.py), polling by the HDF_SUPERNODE_* environment, which
  the result records (`supernode_poll`); `--flower-poll` gives them Flower's own fixed waits
  (3 s idle, 0.5 s for a reply) to measure what the brisker poll saves.

Per round means: from the moment round 0's row appears in the run folder's metrics.jsonl to the
moment the last row appears, divided by the rounds in between (read from the run folder, never
by polling `flwr ls`). Over that window it samples, each time a row appears:
- wall seconds (`deployed_round_s`; `simulated_round_s` is the same window's sum of the rows'
  `seconds` in the simulation, which has no start-up inside it either);
- CPU seconds per process kind, from /proc (utime + stime of every live process of the
  SuperLink's and each SuperNode's process tree, plus the reaped children's cutime + cstime):
  `SuperLink` (flower-superlink and the SuperExec beside it), `ServerApp`, `SuperNodes`
  (flower-supernode and its SuperExec), `ClientApps` (every flwr-clientapp process),
  `SiteWorkers` (the sites' warm workers; 0 without `--warm-worker`);
- SuperLink requests: the SuperLink runs with FLWR_LOG_LEVEL=DEBUG, which makes uvicorn log the
  routine requests Flower hides at INFO (flwr/supercore/http_logging.py, ROUTINE_ACCESS_PATHS);
  every `uvicorn.access` line timestamped inside the window counts;
- bytes: what the sites' network interfaces received and sent (TLS, HTTP and all), summed over
  sites.
Machine load (`uptime`) is recorded at start and end: this box is shared, so seconds are noisy.

A failed run keeps its folder (SuperLink, site and `flwr log` output, the run folder) and names
it in the error; `--keep` keeps it after a success too.
The deployed half needs root and `ip` (network namespaces); without them it is skipped and the
reason is printed in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploy.flower_env import apply_flower_env
from deploy.supernode import ENV_REPLY, ENV_WINDOW, FLOWER_REPLY_SLEEP_S, policy_from_env

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["studio", "webcam", "movie"]
KINDS = ("SuperLink", "ServerApp", "SuperNodes", "ClientApps", "SiteWorkers")
CLK_TCK = os.sysconf("SC_CLK_TCK")
ACCESS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \w+ \[uvicorn\.access\]")
MODELS = {"tiny": [], "r3d_18": ["model=r3d_18", "data.num_frames=8", "data.size=32"]}
# Flower 1.42 keeps the SuperLink's state in memory for this name (flwr/supercore/constant.py)
IN_MEMORY_DB = ":flwr-in-memory:"


class BenchError(RuntimeError):
    """A run that failed; the message names the folder its logs were kept in."""


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def model_bytes(overrides: list[str]) -> dict[str, int]:
    """Bytes of one model on the wire: packed (one array) in float32 and in bfloat16."""
    from hdf.config import compose, model_settings
    from hdf.models import build_model
    from hdf.packing import pack

    cfg = compose(overrides)
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return {
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "arrays": len(state),
        "model_bytes_fp32": int(pack(state)[0].nbytes),
        "model_bytes_bf16": int(pack(state, "bfloat16")[0].nbytes),
    }


def run_simulation(overrides: list[str], out: Path) -> dict[str, Any]:
    env = {**os.environ, "WANDB_MODE": "disabled", "FLWR_HOME": str(out / "flwr-home")}
    r = subprocess.run(
        [sys.executable, "-m", "simulations.run", *overrides, f"output.root={out / 'runs'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if r.returncode != 0:
        (out / "simulation.log").write_text(r.stdout + r.stderr)
        raise BenchError(f"simulation failed; output kept in {out / 'simulation.log'}")
    rows = _rows(Path(r.stdout.strip().splitlines()[-1]))
    # every round's training and evaluation (round 0's and the last one's included), as the
    # deployment's window; start-up and node discovery are in no row
    rounds = len(rows) - 1
    return {"round_s": sum(float(x["seconds"]) for x in rows) / rounds, "rounds": rounds}


# ---- what the deployed processes use ----------------------------------------------------------
def _stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, own CPU seconds, reaped children's CPU seconds) of a process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return int(fields[1]), (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


def _kind(pid: int, host: str, parent_children: str) -> tuple[str, str]:
    """(kind of the process, kind of its reaped children) by its command line. A zombie has
    none: it is what its parent starts (a finished ClientApp not yet reaped)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        cmd = ""
    if not cmd:
        return parent_children, parent_children
    if "flwr-serverapp" in cmd:
        return "ServerApp", "ServerApp"
    if "flwr-clientapp" in cmd:
        return "ClientApps", "ClientApps"
    if "client.worker" in cmd:
        return "SiteWorkers", "SiteWorkers"
    if "flower-superexec" in cmd:  # its children are the apps it starts
        return host, "ServerApp" if host == "SuperLink" else "ClientApps"
    return host, host


def cpu_by_kind(trees: dict[int, str]) -> dict[str, float]:
    """CPU seconds so far per kind over the process trees rooted at `trees` (pid -> host kind)."""
    from testbed.proctree import tree_pids

    out = dict.fromkeys(KINDS, 0.0)
    for root, host in trees.items():
        children: dict[int, str] = {}
        for pid in tree_pids(root):  # parents come before their children
            stat = _stat(pid)
            if stat is None:
                continue
            ppid, own, reaped = stat
            kind, child = _kind(pid, host, children.get(ppid, host))
            children[pid] = child
            out[kind] += own
            out[child] += reaped
    return out


def site_bytes(namespaces: list[str]) -> int:
    """Bytes the sites' interfaces received and sent so far."""
    total = 0
    for ns in namespaces:
        for way in ("rx", "tx"):
            r = subprocess.run(
                ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/eth0/statistics/{way}_bytes"],
                capture_output=True,
                text=True,
                check=True,
            )
            total += int(r.stdout)
    return total


def requests_between(log: Path, t0: float, t1: float) -> int:
    """SuperLink requests logged between the epoch times t0 and t1."""
    lo, hi = (
        datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] for t in (t0, t1)
    )
    n = 0
    for line in log.read_text(errors="replace").splitlines():
        m = ACCESS.match(line)
        if m and lo <= m.group(1) <= hi:
            n += 1
    return n


class _Log:
    """The SuperLink's log, read as it grows: counts the ServerApp's pushes of messages."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.pushes, self.tail = path, 0, 0, ""

    def poll(self) -> int:
        with open(self.path, errors="replace") as fh:
            fh.seek(self.offset)
            text = self.tail + fh.read()
            self.offset = fh.tell()
        lines = text.split("\n")
        self.tail = lines.pop()
        self.pushes += sum("/v1/runtime/push-messages" in x for x in lines)
        return self.pushes


def run_deployment(
    overrides: list[str],
    sources: list[str],
    rounds: int,
    out: Path,
    warm_worker: bool = False,
    memory_db: bool = False,
) -> dict[str, Any]:
    """The deployed run, measured from the ServerApp's second push of messages (the first is
    node discovery's query; the second starts round 1, or round 0's evaluation with two
    exchanges a round) to the last row: every round's training and evaluation, no start-up."""
    from testbed.cluster import Cluster

    t0 = time.monotonic()
    run_dir = out / "deploy-run"
    start: dict[str, Any] | None = None
    # the sites read the clips the simulation generated (same seed, same clips)
    with Cluster(out / "cluster", sources, shared_data=out / "data") as c:
        db = ["--database", IN_MEMORY_DB] if memory_db else []
        c.start_superlink(env={"FLWR_LOG_LEVEL": "DEBUG"}, args=db)
        for s in sources:
            c.register(s)
            c.start_site(s, warm_worker=warm_worker)
        c.wait_for(lambda: c.online() == len(sources), 120, "sites online")
        up = time.monotonic() - t0
        trees = {c.superlink.pid: "SuperLink"}
        trees.update({site.proc.pid: "SuperNodes" for site in c.sites.values() if site.proc})
        namespaces = [site.ns for site in c.sites.values()]

        def sample() -> dict[str, Any]:
            return {"t": time.time(), "cpu": cpu_by_kind(trees), "bytes": site_bytes(namespaces)}

        log = _Log(out / "cluster" / "superlink.log")
        run_id = c.submit(" ".join(overrides), run_dir)
        deadline, next_status = time.monotonic() + 3600, time.monotonic() + 30
        while len(_rows(run_dir)) < rounds + 1:
            if start is None and log.poll() >= 2:
                start = sample()
            if time.monotonic() > next_status:  # a crashed ServerApp writes no more rows
                status = c.status(run_id)
                if status.startswith("finished") and len(_rows(run_dir)) < rounds + 1:
                    (out / "flwr-log.txt").write_text(c.log(run_id))
                    raise BenchError(f"deployed run {status}; logs kept in {out}")
                next_status = time.monotonic() + 30
            if time.monotonic() > deadline:
                raise BenchError(f"deployed run not done within an hour; logs kept in {out}")
            time.sleep(0.25)
        last = sample()
        c.wait_for(lambda: (run_dir / "done").exists(), 300, "the run's done marker")
        (out / "flwr-log.txt").write_text(c.log(run_id))
    if start is None:
        raise BenchError(f"no second push of messages in the SuperLink log; logs kept in {out}")
    requests = requests_between(out / "cluster" / "superlink.log", start["t"], last["t"])
    return {
        "round_s": (last["t"] - start["t"]) / rounds,
        "rounds": rounds,
        "startup_s": up,
        "superlink_requests_per_round": requests / rounds,
        "bytes_per_round": (last["bytes"] - start["bytes"]) / rounds,
        "cpu_s_per_round": {k: (last["cpu"][k] - start["cpu"][k]) / rounds for k in KINDS},
        "row_seconds": [round(float(r["seconds"]), 2) for r in _rows(run_dir)],
    }


def measure(
    sources: list[str],
    rounds: int,
    model: str,
    extra: list[str],
    out: Path,
    warm_worker: bool = False,
    memory_db: bool = False,
) -> dict:
    """One site count: the simulation and the deployment of the same config."""
    overrides = [
        "experiment=deploy_tiny",
        f"data.sources=[{','.join(sources)}]",
        "data.heldout=[]",
        "server.heldout_eval=server",
        f"rounds={rounds}",
        f"data.root={out / 'data'}",
        "+train.threads=1",
        *MODELS[model],
        # DRO's cap (0.5 in deploy_tiny) needs at least 2 sources; one site takes all weight
        *(["strategy.dro.cap=1.0"] if len(sources) == 1 else []),
        *extra,
    ]
    sim = run_simulation(overrides, out)
    res: dict[str, Any] = {"sites": len(sources), "simulated_round_s": sim["round_s"]}
    from testbed.cluster import why_no_netns

    reason = why_no_netns()
    if reason:
        return {**res, "deployed": {"skipped": reason}}
    dep = run_deployment(overrides, sources, rounds, out, warm_worker, memory_db)
    return {
        **res,
        "deployed_round_s": dep["round_s"],
        "overhead_s": dep["round_s"] - sim["round_s"],
        "superlink_requests_per_round": dep["superlink_requests_per_round"],
        "bytes_per_round": dep["bytes_per_round"],
        "cpu_s_per_round": dep["cpu_s_per_round"],
        "rounds": dep["rounds"],
        "startup_s": dep["startup_s"],
        "deployed_row_seconds": dep["row_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--sites", default="3,1", help="site counts to measure, e.g. 3,1")
    p.add_argument("--warm-worker", action="store_true", help="run each site's warm worker")
    p.add_argument(
        "--memory-db",
        action="store_true",
        help="SuperLink state in memory instead of SQLite (lost when the SuperLink stops)",
    )
    p.add_argument(
        "--flower-poll",
        action="store_true",
        help="SuperNodes with Flower's fixed waits (3 s idle, 0.5 s for a reply)",
    )
    p.add_argument("--keep", action="store_true", help="keep the working folder after success")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    apply_flower_env()
    if args.flower_poll:  # the sites inherit this environment (testbed/cluster.py)
        os.environ.update({ENV_WINDOW: "0", ENV_REPLY: str(FLOWER_REPLY_SLEEP_S)})
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    result: dict[str, Any] = {
        "model": args.model,
        "warm_worker": args.warm_worker,
        "memory_db": args.memory_db,
        "supernode_poll": asdict(policy_from_env()),
    }
    result.update({"uptime_start": _uptime(), "work_dir": str(work)})
    result.update(model_bytes(["experiment=deploy_tiny", *MODELS[args.model], *args.overrides]))
    try:
        for k in (int(x) for x in args.sites.split(",")):
            out = work / f"sites-{k}"
            result[f"sites_{k}"] = measure(
                SOURCES[:k],
                args.rounds,
                args.model,
                args.overrides,
                out,
                args.warm_worker,
                args.memory_db,
            )
    except Exception as err:  # keep everything for a post-mortem, and say where
        result["error"] = f"{type(err).__name__}: {err}"[-3000:]
        result["kept"] = str(work)
        print(json.dumps(result))
        print(
            f"bench_deploy failed: {result['error']} (everything kept in {work})", file=sys.stderr
        )
        return 1
    result["uptime_end"] = _uptime()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        del result["work_dir"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
