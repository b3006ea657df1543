"""docker-compose.yml brought up for real on one machine with Debian's podman and podman-compose.

Used by tests/test_deploy.py (`make test-deploy`). Flower's published images cannot be pulled
where this was built (no registry), so every service runs on `localhost/hdf-debian:bookworm`, a
Debian 12 minbase image built here with debootstrap from the Debian mirror, with this machine's
Python and the project's `.venv` (flwr 1.42.0, torch) mounted read-only at their own paths
instead of installed in an image. Everything else comes from docker-compose.yml unchanged: the
services, their commands and flags (TLS, SuperNode authentication, process isolation), the
sites' warm workers, the certificates, data and worker socket volumes, the network. Every
container runs as root here (the image has no user `app`): one user in all of them, as in the
file. Left out: the `gpu` profile's services (podman-compose 1.0.3 has no `--profile`),
`restart`, `build`.

Two things of this machine (a Firecracker VM) need a containers.conf: crun refuses hybrid
cgroups (`cgroups in hybrid mode not supported`), so runc; and without CAP_SYS_RESOURCE the
default ulimits cannot be raised (`setrlimit RLIMIT_NOFILE: Operation not permitted`), so they
are set at or under the host's limits.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from deploy.flower_env import FLOWER_ENV

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/hdf-debian:bookworm"
MIRROR = "http://deb.debian.org/debian"
# what the mounted Python needs from the OS (ssl for TLS, sqlite for the SuperLink state)
PACKAGES = "ca-certificates,libssl3,libsqlite3-0,libffi8,libbz2-1.0,liblzma5,zlib1g,libgomp1"
TOOLS = ("podman", "podman-compose", "runc", "debootstrap")
DNSNAME = Path("/usr/lib/cni/dnsname")  # service names resolve inside the compose network
DNSNAME_PACKAGE = "golang-github-containernetworking-plugin-dnsname"
SITES = ("studio", "webcam", "movie", "cctv", "night_ir", "phone")
ENV = {
    **{k: v for k, v in FLOWER_ENV.items() if k.startswith("FLWR_")},  # as the Dockerfile sets
    "WANDB_MODE": "disabled",
    "HDF_CACHE": "/data",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}


def why_no_podman() -> str | None:
    """None when compose can run here, else the reason and the fix (for pytest.skip)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} missing: apt-get install -y {' '.join(TOOLS)}"
    if not DNSNAME.exists():
        return f"{DNSNAME} missing: apt-get install -y {DNSNAME_PACKAGE}"
    return None


def containers_conf(path: Path) -> Path:
    """runc, and default ulimits the container runtime is allowed to set here."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    path.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    return path


def _run(cmd: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, **kw)


def ensure_image(work: Path, env: dict[str, str]) -> str:
    """The base image: made once (debootstrap, ~3 minutes), then reused."""
    if subprocess.run(["podman", "image", "exists", IMAGE], env=env).returncode == 0:
        return IMAGE
    rootfs = work / "rootfs"
    cmd = ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm"]
    _run([*cmd, str(rootfs), MIRROR], env, timeout=900)
    tar = work / "rootfs.tar"
    _run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], env, timeout=600)
    _run(["podman", "import", str(tar), IMAGE], env, timeout=600)
    shutil.rmtree(rootfs)
    tar.unlink()
    return IMAGE


def local_compose(port: int) -> dict[str, Any]:
    """docker-compose.yml with every service on the base image and the mounted environment;
    the SuperLink published on 127.0.0.1:`port`."""
    src = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    venv_bin = str(Path(sys.executable).parent)
    mounts = [f"{p}:{p}:ro" for p in sorted({sys.base_prefix, str(ROOT)})]
    env = {
        **ENV,
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    services = {}
    for name, svc in src["services"].items():
        if "gpu" in svc.get("profiles", []):
            continue
        image = str(svc.get("image", ""))
        tool = next(t for t in ("superlink", "supernode", "superexec") if t in image)
        svc = {k: v for k, v in svc.items() if k not in ("build", "profiles", "deploy", "restart")}
        # a service's own entrypoint (the warm workers' `python -m client.worker`) keeps its
        # arguments and runs on the mounted environment's interpreter
        own = svc.get("entrypoint")
        svc.update(
            image=IMAGE,
            entrypoint=[f"{venv_bin}/{own[0]}", *own[1:]] if own else [f"{venv_bin}/flower-{tool}"],
            working_dir="/app",  # Flower's images: certificates/... are relative to /app
            environment={**env, **svc.get("environment", {})},  # the service's own win
            volumes=[*svc.get("volumes", []), *mounts],
        )
        if name == "superlink":
            svc["ports"] = [f"127.0.0.1:{port}:8000"]
        services[name] = svc
    return {"services": services, "volumes": src["volumes"]}


def volume_path(project: str, volume: str, env: dict[str, str]) -> Path:
    """Where a compose volume lives on this machine (to read the run folder)."""
    out = _run(["podman", "volume", "inspect", f"{project}_{volume}"], env).stdout
    return Path(json.loads(out)[0]["Mountpoint"])
