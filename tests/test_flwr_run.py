"""`flwr run .` (Flower's managed local SuperLink, simulation mode) reaches our config and
finishes `finished:completed`; `flwr run --stream` exits 0 even on failure, so the status is read
with `flwr ls`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.flower_env import FLOWER_ENV

ROOT = Path(__file__).resolve().parents[1]
FLWR = Path(sys.executable).parent / "flwr"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _superlink_pids(flwr_home: Path) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True
    )
    return [int(p) for p in out.stdout.split()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pgrep") is None, reason="pgrep is needed to stop the SuperLink")
def test_flwr_run_finishes_completed(tmp_path) -> None:
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "WANDB_MODE": "disabled",
        "PATH": f"{FLWR.parent}:{os.environ['PATH']}",
    }
    run_dir = tmp_path / "run"
    overrides = (
        f"experiment=tiny data.sources=[studio,webcam,phone] data.heldout=[phone] "
        f"data.root={tmp_path / 'cache'} rounds=1"
    )
    cmd = [
        str(FLWR), "run", ".", "--format", "json",
        "--federation-config", "num-supernodes=2 client-resources-num-cpus=1",
        "--run-config", f"overrides='{overrides}' run-dir='{run_dir}'",
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        run_id = json.loads(out.stdout)["run-id"]
        status, deadline = "", time.monotonic() + 400
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(3)
            ls = subprocess.run(
                [str(FLWR), "ls", "--run-id", str(run_id), "--format", "json"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            status = json.loads(ls.stdout)["runs"][0]["status"]
        log = home / "local-superlink" / "superlink.log"
        assert status == "finished:completed", (status, log.read_text()[-3000:])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1]
        assert set(rows[-1]["train"]) == {"studio", "webcam"}
        assert set(rows[-1]["heldout"]) == {"phone"}
        assert (run_dir / "done").exists()
    finally:
        for pid in _superlink_pids(home):
            os.kill(pid, signal.SIGTERM)
