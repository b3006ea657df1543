"""A real multi-host federation on one Linux machine: every host in its own network namespace.

Used by tests/test_deploy.py and bench/bench_deploy.py. Topology (all addresses private, inside
the namespaces only; nothing is routed to the outside and the root namespace gets no address):

    <tag>-hub   a bridge `br0`; every other namespace hangs off it with a veth pair
    <tag>-link  the SuperLink (10.<n>.0.1), TLS + SuperNode authentication
    <tag>-adm   the researcher: `flwr supernode register`, `flwr run`, `flwr ls` (10.<n>.0.2)
    <tag>-sK    site K: one SuperNode serving one source from its own data root (10.<n>.0.(10+K))

Every process is started through deploy/superlink.sh and deploy/supernode.sh (the documented
scripts) in its own process group, and stopped by that group's id. `Cluster.close()` stops them
all and deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.flower_env import FLOWER_ENV, SUPERLINK_ENV
from testbed.proctree import tree_pids

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PORT = 9443  # the SuperLink's one HTTPS port (Fleet, Control and Runtime APIs)

BASE_ENV = {
    **FLOWER_ENV,
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
}


def why_no_netns() -> str | None:
    """None when network namespaces can be made here, else the reason (for pytest.skip)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if shutil.which("ip") is None:
        return "the `ip` binary (iproute2) is missing: apt-get install iproute2"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    name = f"hdfprobe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    r = subprocess.run(
        ["ip", "link", "add", f"{name[:10]}a", "type", "veth", "peer", "name", f"{name[:10]}b"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return f"cannot create veth pairs: {r.stderr.strip()}"
    subprocess.run(["ip", "link", "del", f"{name[:10]}a"], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class Netns:
    """A bridge namespace and one namespace per host, each with a private address."""

    def __init__(self, tag: str, subnet: int) -> None:
        self.tag, self.subnet = tag, subnet
        self.hub = f"{tag}-hub"
        self.hosts: dict[str, str] = {}  # namespace -> address
        subprocess.run(["ip", "netns", "add", self.hub], check=True, capture_output=True)
        _ip("link", "set", "lo", "up", ns=self.hub)
        _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        _ip("link", "set", "br0", "up", ns=self.hub)

    def add_host(self, short: str, host_id: int) -> tuple[str, str]:
        ns = f"{self.tag}-{short}"
        addr = f"10.{self.subnet}.0.{host_id}"
        a, b = f"{self.tag}{short}a"[:15], f"{self.tag}{short}b"[:15]
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        _ip("link", "set", a, "netns", ns)
        _ip("link", "set", b, "netns", self.hub)
        _ip("link", "set", b, "master", "br0", ns=self.hub)
        _ip("link", "set", b, "up", ns=self.hub)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "set", a, "name", "eth0", ns=ns)
        _ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        self.hosts[ns] = addr
        return ns, addr

    def cut(self, ns: str, up: bool = False) -> None:
        """Pull (or plug back) a host's cable."""
        _ip("link", "set", "eth0", "up" if up else "down", ns=ns)

    def close(self) -> None:
        for ns in [*self.hosts, self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.hosts.clear()


@dataclass
class Proc:
    """A process started in its own group; stopped by that group id."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    offset: int = 0  # where this process's output starts in `log` (restarts append)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL, wait_s: float = 15.0) -> None:
        """Signal the process and every descendant, each by its pid (Flower starts its
        SuperExec in a new session, so a process group alone would miss it)."""
        pids = tree_pids(self.popen.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=wait_s)
        for pid in pids:  # whatever ignored the first signal
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(timeout=5)

    def text(self) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace")


@dataclass
class Site:
    name: str  # the source it serves
    ns: str
    addr: str
    key: Path
    data_root: Path
    proc: Proc | None = None


@dataclass
class Cluster:
    """SuperLink + SuperNodes in namespaces, with TLS and SuperNode authentication."""

    workdir: Path
    sources: list[str]
    tag: str = field(default_factory=lambda: "h" + secrets.token_hex(2))
    subnet: int = field(default_factory=lambda: 200 + secrets.randbelow(50))
    shared_data: Path | None = None  # one data root for every site (cache reuse in benchmarks)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.net = Netns(self.tag, self.subnet)
        self.link_ns, self.link_addr = self.net.add_host("link", 1)
        self.adm_ns, _ = self.net.add_host("adm", 2)
        self.certs = self.workdir / "certs"
        self.sites: dict[str, Site] = {}
        for k, src in enumerate(self.sources):
            ns, addr = self.net.add_host(f"s{k}", 10 + k)
            root = self.shared_data or self.workdir / f"data-{src}"
            self.sites[src] = Site(src, ns, addr, self.certs / "nodes" / src, root)
        subprocess.run(
            [sys.executable, str(DEPLOY / "make_certs.py"), "--out", str(self.certs)]
            + ["--san", self.link_addr, "--san", "superlink"]
            + [a for s in self.sources for a in ("--node", s)],
            check=True,
            capture_output=True,
        )
        self.adm_home = self.workdir / "adm-home"
        env = {**os.environ, **BASE_ENV, "FLWR_HOME": str(self.adm_home)}
        subprocess.run(
            [
                sys.executable,
                str(DEPLOY / "connection.py"),
                "hdf",
                "--address",
                self.address,
                "--ca",
                str(self.certs / "ca.crt"),
                "--default",
            ],
            check=True,
            capture_output=True,
            env=env,
        )

    @property
    def address(self) -> str:
        return f"{self.link_addr}:{PORT}"

    # ---- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, ns: str, cmd: list[str], env: dict[str, str]) -> Proc:
        log = self.workdir / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *cmd],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, **BASE_ENV, **env},
                cwd=ROOT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log, offset)
        self.procs.append(proc)
        return proc

    def start_superlink(
        self, env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> Proc:
        """Start the SuperLink (`env`: extra environment, e.g. FLWR_LOG_LEVEL for a benchmark;
        `args`: extra flower-superlink flags, e.g. `--database :flwr-in-memory:`)."""
        state = self.workdir / "superlink-state"
        proc = self._spawn(
            "superlink",
            self.link_ns,
            [
                "bash",
                str(DEPLOY / "superlink.sh"),
                "--certs",
                str(self.certs),
                "--host",
                self.link_addr,
                "--port",
                str(PORT),
                "--state",
                str(state),
                *(args or []),
            ],
            {
                # the SuperLink's own values over the sites' (BASE_ENV), then the caller's
                **{k: v for k, v in SUPERLINK_ENV.items() if FLOWER_ENV.get(k) != v},
                "FLWR_HOME": str(state / "flwr-home"),
                **(env or {}),
            },
        )
        self.superlink = proc
        self.wait_for(
            lambda: "Uvicorn running on https" in proc.text(), 60, "SuperLink start", proc
        )
        return proc

    def register(self, source: str) -> dict[str, Any]:
        return self.flwr("supernode", "register", str(self.sites[source].key) + ".pub", "hdf")

    def new_key(self, source: str, name: str) -> Path:
        """A new key pair for a site (a reinstalled machine), registered: a new node id."""
        subprocess.run(
            [
                sys.executable,
                str(DEPLOY / "make_certs.py"),
                "--out",
                str(self.certs),
                "--node",
                name,
            ],
            check=True,
            capture_output=True,
        )
        self.sites[source].key = self.certs / "nodes" / name
        out = self.register(source)
        if not out.get("success"):
            raise RuntimeError(f"registering {name} failed: {out}")
        return self.sites[source].key

    def start_site(self, source: str, key: Path | None = None, warm_worker: bool = False) -> Proc:
        """Start a site's SuperNode (`warm_worker`: with its warm worker, client/worker.py)."""
        site = self.sites[source]
        proc = self._spawn(
            f"site-{source}",
            site.ns,
            [
                "bash",
                str(DEPLOY / "supernode.sh"),
                "--superlink",
                self.address,
                "--source",
                source,
                "--data-root",
                str(site.data_root),
                "--key",
                str(key or site.key),
                "--ca",
                str(self.certs / "ca.crt"),
                "--state",
                str(self.workdir / f"node-{source}"),
                *(["--warm-worker"] if warm_worker else []),
            ],
            {"FLWR_HOME": str(self.workdir / f"node-{source}" / "flwr-home")},
        )
        site.proc = proc
        return proc

    def stop_site(self, source: str, sig: int = signal.SIGKILL) -> None:
        proc = self.sites[source].proc
        if proc is not None:
            proc.kill(sig)

    # ---- the researcher's CLI ----------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run `flwr ARGS --format json` in the researcher's namespace; its JSON answer."""
        cmd = ["ip", "netns", "exec", self.adm_ns, str(Path(sys.executable).parent / "flwr")]
        r = subprocess.run(
            [*cmd, *args, "--format", "json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=timeout,
            env={**os.environ, **BASE_ENV, "FLWR_HOME": str(self.adm_home)},
        )
        start = r.stdout.find("{")
        if start < 0:
            raise RuntimeError(f"flwr {' '.join(args)}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
        return json.loads(r.stdout[start:])

    def nodes(self) -> list[dict[str, Any]]:
        """Registered SuperNodes with their status ([] while the SuperLink is unreachable)."""
        try:
            return list(self.flwr("supernode", "list", "hdf").get("nodes", []))
        except RuntimeError:
            return []

    def online(self) -> int:
        return sum(n["status"] == "online" for n in self.nodes())

    def submit(self, overrides: str, run_dir: Path | str = "") -> int:
        """`flwr run . hdf` with the Hydra overrides (as in simulation); the run id."""
        cfg = f"overrides='{overrides}' run-dir='{run_dir}'"
        out = self.flwr("run", ".", "hdf", "--run-config", cfg)
        if not out.get("success", True) or "run-id" not in out:
            raise RuntimeError(f"flwr run failed: {out}")
        return int(out["run-id"])

    def status(self, run_id: int) -> str:
        runs = self.flwr("ls", "hdf", "--run-id", str(run_id))["runs"]
        return str(runs[0]["status"])

    def wait_run(self, run_id: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(2.0)
        return f"timeout ({status})"

    def log(self, run_id: int) -> str:
        cmd = ["ip", "netns", "exec", self.adm_ns, str(Path(sys.executable).parent / "flwr")]
        r = subprocess.run(
            [*cmd, "log", str(run_id), "hdf", "--show"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env={**os.environ, **BASE_ENV, "FLWR_HOME": str(self.adm_home)},
        )
        return r.stdout + r.stderr

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def wait_for(pred: Any, timeout: float, what: str, proc: Proc | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{what}: {proc.name} exited\n{proc.text()[-3000:]}")
            time.sleep(0.5)
        tail = proc.text()[-3000:] if proc is not None else ""
        raise TimeoutError(f"{what}: not done within {timeout:.0f} s\n{tail}")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill(signal.SIGTERM, wait_s=10)
        self.procs.clear()
        self.net.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
