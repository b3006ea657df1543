"""Joining an existing Ray cluster: the backend config, the address check, and a real two-node
cluster on this machine whose two nodes both serve clients of one federation."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from hdf.config import compose
from simulations import run as simulation_run
from simulations.ray_cluster import address_env, backend_config, cluster_address
from testbed.groups import stop_process_groups

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def listening() -> Iterator[str]:
    """host:port of a socket that accepts connections (stands in for a Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def _dead_address() -> str:
    """host:port where nothing listens (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_local_ray_gets_every_core_and_no_address(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = compose(["simulation.num_gpus_per_client=0.5"])
    assert cluster_address(cfg) is None
    bc = backend_config(cfg, None)
    assert bc["init_args"]["num_cpus"] == os.cpu_count()
    assert "address" not in bc["init_args"]
    assert bc["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}


def test_ray_address_joins_without_num_cpus(monkeypatch, listening) -> None:
    """Ray refuses num_cpus when joining a cluster; per-client resources still apply."""
    monkeypatch.setenv("RAY_ADDRESS", listening)
    cfg = compose(["simulation.num_cpus_per_client=2", "simulation.num_gpus_per_client=0.25"])
    address = cluster_address(cfg)
    assert address == listening
    bc = backend_config(cfg, address)
    assert "num_cpus" not in bc["init_args"]
    assert bc["init_args"]["address"] == listening
    assert bc["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}


def test_config_key_wins_over_the_environment_for_the_run_only(monkeypatch, listening) -> None:
    """ray.init reads RAY_ADDRESS before its own argument, so the key must reach it there."""
    monkeypatch.setenv("RAY_ADDRESS", _dead_address())
    before = os.environ["RAY_ADDRESS"]
    cfg = compose([f"simulation.ray_address={listening}"])
    address = cluster_address(cfg)
    assert address == listening
    with address_env(address):
        assert os.environ["RAY_ADDRESS"] == listening
    assert os.environ["RAY_ADDRESS"] == before
    # The key saying local overrides a cluster in the environment: Ray is told "local".
    local = compose(["simulation.ray_address=local"])
    assert cluster_address(local) is None
    with address_env(None):
        assert os.environ["RAY_ADDRESS"] == "local"
    assert os.environ["RAY_ADDRESS"] == before
    monkeypatch.delenv("RAY_ADDRESS")
    with address_env(None):
        assert "RAY_ADDRESS" not in os.environ


def test_address_where_no_cluster_answers_is_one_line_naming_it(monkeypatch, tmp_path, capsys):
    """Ray itself waits without end on such an address; the run stops before its folder."""
    dead = _dead_address()
    monkeypatch.setenv("RAY_ADDRESS", dead)
    root = tmp_path / "runs"
    assert simulation_run.main(["experiment=tiny", f"output.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: RAY_ADDRESS={dead}: no Ray cluster answers there")
    assert f"ray start --head --port={dead.split(':')[1]}" in err
    assert not root.exists()
    for bad in ("auto", "ray://10.0.0.5:10001", "10.0.0.5", "10.0.0.5:http"):
        with pytest.raises(ValueError, match="give the head node's host:port"):
            cluster_address(compose([f"simulation.ray_address='{bad}'"]))


# ---- a real two-node cluster ---------------------------------------------------------------
READY = "Ray runtime started"
SITE_LINE = re.compile(r"site (\w+): built in pid \d+ on \S+, Ray node ([0-9a-f]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_ports() -> list[str]:
    """Ports a node would otherwise take at fixed defaults, which other Rays on this machine
    (another node of this cluster, other local simulations) may hold."""
    return [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]


def _start_node(args: list[str], temp_dir: Path) -> subprocess.Popen:
    """`ray start --block` in its own process group and temp dir: stopping it stops its node."""
    temp_dir.mkdir()
    log = open(temp_dir / "start.log", "w")  # noqa: SIM115 (closed with the process)
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *_own_ports()]
    return subprocess.Popen(
        [*cmd, f"--temp-dir={temp_dir}", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_ready(node: subprocess.Popen, temp_dir: Path, timeout_s: float = 120) -> None:
    log = temp_dir / "start.log"
    deadline = time.monotonic() + timeout_s
    while READY not in log.read_text():
        if node.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray node did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def _stop(nodes: list[subprocess.Popen], base: Path) -> None:
    """SIGTERM each node's process group, SIGKILL what is left; then any process naming this
    cluster's temp dir (its raylet's workers). `ray stop` would stop every Ray on the machine."""
    stop_process_groups(nodes, wait_s=30)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(base) in cmdline:
            with suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


@contextmanager
def two_node_cluster() -> Iterator[str]:
    """A head and a second node, one CPU each, on this machine; yields the head's address.
    Sockets live in the temp dir, whose path must stay short (Unix socket paths < 108 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="hdfray-", dir="/tmp"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    try:
        head_args = [
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            f"--ray-client-server-port={_free_port()}",
        ]
        nodes.append(_start_node(head_args, base / "head"))
        _wait_ready(nodes[0], base / "head")
        worker_args = [f"--address={address}", "--node-ip-address=127.0.0.1"]
        nodes.append(_start_node(worker_args, base / "node2"))
        _wait_ready(nodes[1], base / "node2")
        yield address
    finally:
        _stop(nodes, base)
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.slow
def test_a_federation_on_a_two_node_cluster_uses_both_nodes(tmp_path) -> None:
    """5 training sources, 2 rounds, one client per CPU: the pool has one actor per node, and the
    sites' own report of their Ray node names both nodes. A local Ray would be one node only."""
    with two_node_cluster() as address:
        env = {
            **os.environ,
            "RAY_ADDRESS": address,
            "WANDB_MODE": "disabled",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        proc = subprocess.run(
            [sys.executable, "-m", "simulations.run", "experiment=tiny", f"output.root={tmp_path}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"joining the Ray cluster at {address}" in out
    served = SITE_LINE.findall(out)
    nodes = {node for _, node in served}
    assert len(nodes) == 2, out[-3000:]
    assert {site for site, _ in served} == {"studio", "webcam", "movie", "cctv", "night_ir"}
    run_dir = Path(proc.stdout.strip().splitlines()[-1])  # the last line printed
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # rounds 0, 1 and 2
