"""Deployment (issue 6): certificates, node authentication, docker-compose.yml, and a real
multi-host federation in Linux network namespaces with a lost site and a killed server.

The namespace tests need root and `ip`; where either is missing they are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from deploy.connection import add_connection
from deploy.make_certs import main as make_certs
from deploy.make_certs import server_sans
from testbed import cluster as cl
from testbed.groups import stop_process_groups

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FLWR_VERSION = "1.42.0"
TRAIN = ["studio", "webcam", "movie"]
HELDOUT = "phone"


def _env(home: Path) -> dict[str, str]:
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # flower-* spawn flower-superexec
    return {**os.environ, **cl.BASE_ENV, "FLWR_HOME": str(home), "COLUMNS": "200", "PATH": path}


# ---- certificates and the connection file ------------------------------------------------------
def test_make_certs_sans_chain_and_key_formats(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    out = tmp_path / "certs"
    assert make_certs(["--out", str(out), "--san", "link.example.org", "--san", "10.1.2.3"]) == 0
    assert make_certs(["--out", str(out), "--node", "site-a"]) == 0  # adds a node, keeps the CA
    sans = server_sans(out / "server.pem")
    assert {"link.example.org", "10.1.2.3", "localhost", "127.0.0.1"} <= set(sans)
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # the formats flower-supernode and `flwr supernode register` read
    key = load_ssh_private_key((out / "nodes" / "site-a").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(out / "nodes" / "site-a.pub")
    assert oct((out / "nodes" / "site-a").stat().st_mode & 0o777) == "0o600"
    assert (out / "superexec.secret").stat().st_size == 64
    site = tmp_path / "site"  # a site makes its own key pair; nothing else
    assert make_certs(["--out", str(site), "--node-only", "--node", "b"]) == 0
    assert sorted(p.name for p in site.rglob("*") if p.is_file()) == ["b", "b.pub"]


def test_connection_file_is_read_by_flwr(tmp_path: Path, monkeypatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "ca.crt").write_text("x")
    add_connection("hdf", "10.0.0.5:9443", str(tmp_path / "ca.crt"), default=True)
    add_connection("other", "127.0.0.1:8000", None, insecure=True)
    data = tomllib.loads((tmp_path / "config.toml").read_text())
    assert data["superlink"]["default"] == "hdf" and data["superlink"]["local"]
    conn = read_superlink_connection("hdf")
    assert conn.address == "10.0.0.5:9443"
    assert conn.root_certificates == str(tmp_path / "ca.crt")
    assert read_superlink_connection(None).address == "10.0.0.5:9443"


# ---- docker-compose.yml ------------------------------------------------------------------------
def _flags(binary: str, home: Path) -> tuple[set[str], set[str]]:
    """(every flag, the deprecated ones) from `binary --help` of the installed flwr."""
    text = subprocess.run(
        [str(BIN / binary), "--help"], capture_output=True, text=True, env=_env(home), timeout=60
    ).stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", text))
    deprecated = set()
    for block in re.split(r"\n  (?=-)", text):
        names = re.findall(r"^(?:-\w, )?(--[a-z][a-z0-9-]+)", block)
        if names and "deprecated" in block.lower():
            deprecated.add(names[0])
    assert "--help" in flags, f"{binary} --help printed nothing useful:\n{text}"
    return flags, deprecated


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _args(svc: dict) -> list[str]:
    cmd = svc["command"]
    assert isinstance(cmd, list), "write commands as YAML lists (no shell word splitting)"
    return [str(a) for a in cmd]


def _opt(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing in {args}"
    return args[args.index(flag) + 1]


WORKER_ENTRYPOINT = ["python", "-m", "client.worker"]  # a site's warm worker
SUPERNODE_ENTRYPOINT = ["hdf-supernode"]  # a site's SuperNode: Flower's, polling briskly
ENTRYPOINTS = (WORKER_ENTRYPOINT, SUPERNODE_ENTRYPOINT)  # the only ones a service may override


def _is_supernode(svc: dict) -> bool:
    return svc.get("entrypoint") == SUPERNODE_ENTRYPOINT


def _is_worker(svc: dict) -> bool:
    return svc.get("entrypoint") == WORKER_ENTRYPOINT


def _worker_args(name: str, svc: dict) -> argparse.Namespace:
    """A worker service's command as client/worker.py's own parser reads it."""
    from client.worker import parser

    try:
        return parser().parse_args(_args(svc))
    except SystemExit:  # argparse printed why (captured above)
        pytest.fail(f"{name}: python -m client.worker refuses its command {_args(svc)}")


def _mounts(svc: dict) -> dict[str, str]:
    """A service's volumes as {path in the container: volume or host path}."""
    return {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}


def test_compose_schema_and_images(compose: dict) -> None:
    import flwr

    assert flwr.__version__ == FLWR_VERSION
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"flwr[simulation]=={FLWR_VERSION}" in pyproject["project"]["dependencies"]
    services, volumes = compose["services"], compose["volumes"]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={FLWR_VERSION}" in dockerfile
    assert "FROM flwr/superexec:${FLWR_VERSION}" in dockerfile
    assert re.search(r'^ENTRYPOINT \["flower-superexec"\]', dockerfile, re.M)
    for name, svc in services.items():
        assert set(svc) <= {
            "image", "build", "command", "ports", "volumes", "depends_on", "restart",
            "profiles", "deploy", "environment", "entrypoint",
        }, name  # fmt: skip
        if "entrypoint" in svc:  # else its command would escape the flag checks below
            assert svc["entrypoint"] in ENTRYPOINTS, f"{name}: {svc['entrypoint']}"
        image = svc["image"]
        if image.startswith("flwr/"):
            assert image.split(":")[1] == FLWR_VERSION, f"{name}: {image}"
        else:
            assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
            assert str(svc["build"]["args"]["FLWR_VERSION"]) == FLWR_VERSION
            assert image.endswith(f"flwr-{FLWR_VERSION}"), image
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith("."):
                assert src in volumes, f"{name}: volume {src} not declared"
            else:
                assert (ROOT / src).resolve().parent == ROOT, f"{name}: {src} outside the repo"
    gpu = [s for s in services.values() if "gpu" in s.get("profiles", [])]
    assert gpu, "no GPU variant"
    for svc in gpu:
        dev = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_compose_commands_use_flwr_142_flags(compose: dict, tmp_path: Path) -> None:
    binaries = {
        "flwr/superlink": "flower-superlink",
        "hdf-fed/superexec": "flower-superexec",  # deploy/Dockerfile's ENTRYPOINT
    }
    # hdf-supernode's --help is Flower's flower-supernode's, read through our entry point
    known = {b: _flags(b, tmp_path) for b in [*binaries.values(), "hdf-supernode"]}
    for name, svc in compose["services"].items():
        if _is_worker(svc):  # a warm worker: its flags are client/worker.py's
            # --stop-with names a process of this container; the container's stop replaces it
            assert _worker_args(name, svc).stop_with is None, name
            continue
        binary = "hdf-supernode" if _is_supernode(svc) else binaries[svc["image"].split(":")[0]]
        flags, deprecated = known[binary]
        for arg in _args(svc):
            if arg.startswith("--"):
                assert arg in flags, f"{name}: {binary} 1.42 has no {arg}"
                assert arg not in deprecated, f"{name}: {arg} is deprecated in 1.42"
        # certificate and key paths point into the read-only certificates mount
        for arg in _args(svc):
            if arg.startswith("certificates/"):
                assert "./certs:/app/certificates:ro" in svc["volumes"], name


def test_compose_federation_is_tls_authenticated_and_one_site_per_source(compose: dict) -> None:
    from flwr.common.config import parse_config_args

    from hdf.config import compose as hydra_compose

    services = compose["services"]
    link = _args(services["superlink"])
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert _opt(link, flag).startswith("certificates/")
    port = _opt(link, "--port")
    assert _opt(link, "--isolation") == "process"
    cfg = hydra_compose(["experiment=deploy"])
    assert str(cfg.server.heldout_eval) == "clients"
    known_sources = ["studio", "webcam", "movie", "phone", "cctv", "night_ir"]
    sites: dict[str, str] = {}
    for name, svc in services.items():
        args = _args(svc)
        if _is_supernode(svc):
            assert "--insecure" not in args
            assert _opt(args, "--superlink") == f"superlink:{port}"
            assert _opt(args, "--root-certificates") == "certificates/ca.crt"
            key = _opt(args, "--auth-supernode-private-key")
            assert _opt(args, "--isolation") == "process"
            node_cfg = parse_config_args([_opt(args, "--node-config")])  # flwr's own parser
            assert node_cfg["source"] in known_sources and node_cfg["data-root"] == "/data"
            assert key == f"certificates/nodes/{node_cfg['source']}"
            sites[name] = str(node_cfg["source"])
    assert sorted(sites.values()) == sorted(known_sources)
    assert set(cfg.data.heldout) <= set(sites.values())
    # every SuperNode has a ClientApp executor with its own data volume
    data_volumes: dict[str, str] = {}
    for name, svc in services.items():
        if not svc["image"].startswith("hdf-fed/") or "entrypoint" in svc:
            continue
        target = _opt(_args(svc), "--runtime-api-address")
        if target.startswith("superlink:"):
            assert target == f"superlink:{port}"
            continue
        node = target.split(":")[0]
        assert node in sites, f"{name} executes for unknown {node}"
        [vol] = [v for v in svc["volumes"] if v.endswith(":/data")]
        assert data_volumes.setdefault(vol, node) == node, f"{vol} shared by two sites"
    assert set(data_volumes.values()) == set(sites)


def test_compose_every_site_has_its_warm_worker_on_a_shared_volume(compose: dict) -> None:
    """Each SuperNode names a worker socket; every ClientApp executor of that site mounts the
    socket's folder from a volume of the site's own, and exactly one worker of the same profile
    listens on that socket on that volume, with the executor's data volume, image, environment
    and GPU. Every worker serves a site."""
    from flwr.common.config import parse_config_args

    services, declared = compose["services"], compose["volumes"]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    workers = {n: _worker_args(n, s) for n, s in services.items() if _is_worker(s)}
    executors = {
        n: s
        for n, s in services.items()
        if s["image"].startswith("hdf-fed/") and "entrypoint" not in s
    }
    socket_volumes: dict[str, str] = {}  # volume -> the SuperNode whose socket it holds
    served: set[str] = set()
    for node, svc in services.items():
        if not _is_supernode(svc):
            continue
        node_cfg = parse_config_args([_opt(_args(svc), "--node-config")])
        raw = node_cfg.get("worker-socket")
        assert raw and PurePosixPath(str(raw)).is_absolute(), (
            f"{node}: node config worker-socket={raw!r}; name the worker's socket (a full path)"
        )
        sock = PurePosixPath(str(raw))
        folder = str(sock.parent)
        # the image makes the folder the worker requires (its user's, mode 700)
        assert f"mkdir -m 700 {folder}" in dockerfile, f"deploy/Dockerfile does not make {folder}"
        mine = {
            n: s
            for n, s in executors.items()
            if _opt(_args(s), "--runtime-api-address").split(":")[0] == node
        }
        assert mine, f"{node} has no ClientApp executor"
        for name, ex in mine.items():
            vol = _mounts(ex).get(folder)
            assert vol in declared, f"{name} mounts no named volume at {folder} ({node}'s socket)"
            assert socket_volumes.setdefault(vol, node) == node, f"{vol} serves two sites"
            same = [
                w
                for w, args in workers.items()
                if str(args.socket) == str(sock)
                and _mounts(services[w]).get(folder) == vol
                and services[w].get("profiles") == ex.get("profiles")
            ]
            assert len(same) == 1, f"{name}: {same or 'no'} worker(s) on {vol}:{sock}"
            worker = services[same[0]]
            assert _mounts(worker).get("/data") == _mounts(ex)["/data"], same[0]
            for key in ("image", "environment", "deploy"):  # deploy: the GPU profile's GPU
                assert worker.get(key) == ex.get(key), f"{same[0]} and {name} differ in {key}"
            served.add(same[0])
    assert served == set(workers), f"workers of no site: {set(workers) - served}"


# ---- node authentication on loopback -----------------------------------------------------------
@pytest.mark.slow
def test_only_registered_supernodes_join(tmp_path: Path, monkeypatch) -> None:
    """TLS + --enable-supernode-auth: registered keys join, unknown key and no key are refused.

    Then a one-round run with `server.site_registry` (studio: good's key, webcam: liar's key):
    the ServerApp sees each node's registered key, so liar, registered for webcam but claiming
    studio, is refused with the reason in metrics.jsonl and studio trains alone."""
    port = _free_port()
    certs = tmp_path / "certs"
    make_certs(["--out", str(certs), "--node", "good", "--node", "rogue", "--node", "liar"])
    home = tmp_path / "cli"
    env = _env(home)
    monkeypatch.setenv("FLWR_HOME", str(home))
    add_connection("hdf", f"127.0.0.1:{port}", str(certs / "ca.crt"), default=True)
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        penv = {**env, "FLWR_HOME": str(tmp_path / (log + ".home"))}
        with open(tmp_path / log, "wb") as fh:
            p = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=penv, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
        procs.append(p)
        return p

    def flwr(*args: str) -> dict:
        r = subprocess.run(
            [str(BIN / "flwr"), *args, "--format", "json"], capture_output=True, text=True,
            env=env, timeout=60,
        )  # fmt: skip
        return json.loads(r.stdout[r.stdout.find("{") :])

    try:
        link = start(
            ["bash", str(ROOT / "deploy/superlink.sh"), "--certs", str(certs), "--host",
             "127.0.0.1", "--port", str(port), "--state", str(tmp_path / "state")],
            "superlink.log",
        )  # fmt: skip
        cl.Cluster.wait_for(
            lambda: "Uvicorn running on https" in (tmp_path / "superlink.log").read_text(), 60,
            "SuperLink start", None,
        )  # fmt: skip
        assert link.poll() is None
        for key in ("good", "liar"):
            assert flwr("supernode", "register", str(certs / f"nodes/{key}.pub"), "hdf")["success"]

        def node(key: str | None, name: str, node_port: int) -> subprocess.Popen:
            config = f'source="studio" data-root="{tmp_path / name}"'
            # hdf-supernode, as deploy/supernode.sh starts it: Flower's SuperNode, our poll
            cmd = [str(BIN / "hdf-supernode"), "--superlink", f"127.0.0.1:{port}",
                   "--root-certificates", str(certs / "ca.crt"), "--port", str(node_port),
                   "--node-config", config, "--max-retries", "1"]  # fmt: skip
            if key:
                cmd += ["--auth-supernode-private-key", str(certs / "nodes" / key)]
            return start(cmd, f"{name}.log")

        # each its own free port: port + k may be any process's (a connection's ephemeral port)
        good = node("good", "good", _free_port())
        liar = node("liar", "liar", _free_port())
        rogue = node("rogue", "rogue", _free_port())
        keyless = node(None, "keyless", _free_port())
        rogue.wait(timeout=60)
        keyless.wait(timeout=60)
        assert rogue.returncode != 0 and keyless.returncode != 0
        assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()
        assert "must be registered" in (tmp_path / "keyless.log").read_text()
        cl.Cluster.wait_for(
            lambda: [n["status"] for n in flwr("supernode", "list", "hdf")["nodes"]]
            == ["online", "online"],
            60, "registered nodes online", None,
        )  # fmt: skip
        assert good.poll() is None and liar.poll() is None

        registry = tmp_path / "sites.yaml"
        registry.write_text(f"studio: {certs}/nodes/good.pub\nwebcam: {certs}/nodes/liar.pub\n")
        run_dir = tmp_path / "run"
        overrides = (
            "experiment=tiny data.sources=[studio,webcam] data.heldout=[] rounds=1 "
            f"server.site_registry={registry} server.wait_for_nodes_s=5"
        )
        out = flwr(
            "run", ".", "hdf", "--run-config", f"overrides='{overrides}' run-dir='{run_dir}'"
        )
        status, deadline = "", time.monotonic() + 300
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(3)
            status = flwr("ls", "hdf", "--run-id", str(out["run-id"]))["runs"][0]["status"]
        assert status == "finished:completed", status
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        refused = [(r["kind"], r["reason"]) for r in rows[0]["rejected"]]
        assert refused == [("query", "claims source 0 but its key is registered for source 1")]
        assert set(rows[1]["clients"]) == {"studio"}
    finally:
        stop_process_groups(procs, wait_s=15)


# ---- a real multi-host federation in network namespaces ----------------------------------------
def _rows(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def check_metrics_contract(
    rows: list[dict], rounds: int, down: dict[int, set[str]] | None = None
) -> None:
    """The metrics.jsonl contract of simulation: one row per round, per-source everything
    (`down`: round -> sites that were away, so have no validation scores that round)."""
    assert [r["round"] for r in rows] == list(range(rounds + 1)), [r["round"] for r in rows]
    for r in rows:
        assert set(r["lambda"]) == set(TRAIN) and abs(sum(r["lambda"].values()) - 1) < 1e-6
        away = (down or {}).get(r["round"], set())
        assert set(r["train"]) == set(TRAIN) - away, r["train"].keys()
        assert set(r["heldout"]) == {HELDOUT}, r["heldout"].keys()
        for v in [*r["train"].values(), *r["heldout"].values()]:
            assert 0 <= v["uar"] <= 1 and 0 <= v["war"] <= 1 and v["loss"] > 0
            assert len(v["recall"]) == 7
    for r in rows[1:]:
        assert set(r["clients"]) <= set(TRAIN) and r["replied"] <= r["sent"]
        assert HELDOUT not in r["clients"]  # the held-out site never trains


OVERRIDES = "experiment=deploy_tiny +train.threads=1"


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    reason = cl.why_no_netns()
    if reason:
        pytest.skip(f"multi-host deployment test needs network namespaces: {reason}")
    work = tmp_path_factory.mktemp("netns")
    c = cl.Cluster(work, [*TRAIN, HELDOUT])
    try:
        c.start_superlink()
        for s in c.sources:
            assert c.register(s)["success"]
        for s in c.sources:
            c.start_site(s)
        c.wait_for(lambda: c.online() == len(c.sources), 90, "every site online")
        yield c
    finally:
        c.close()


def _run(fed: cl.Cluster, run_dir: Path | str, extra: str = "", timeout: float = 600) -> int:
    run_id = fed.submit(f"{OVERRIDES} {extra}".strip(), run_dir)
    status = fed.wait_run(run_id, timeout)
    assert status == "finished:completed", f"{status}\n{fed.log(run_id)[-4000:]}"
    return run_id


@pytest.mark.slow
@pytest.mark.multihost
def test_multihost_run_tls_auth_completes(fed: cl.Cluster, tmp_path: Path) -> None:
    """SuperLink + 4 SuperNodes on 5 hosts; a 2-round run writes the simulation's metrics."""
    addrs = {fed.link_addr, *(s.addr for s in fed.sites.values())}
    assert len(addrs) == 5 and all(a.startswith(f"10.{fed.subnet}.") for a in addrs)
    run_dir = tmp_path / "run"
    _run(fed, run_dir)
    rows = _rows(run_dir)
    check_metrics_contract(rows, 2)
    assert all(r["replied"] == r["sent"] == len(TRAIN) for r in rows[1:])
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoint.pt").exists()
    assert "heldout_eval: clients" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
@pytest.mark.multihost
def test_lost_site_round_finishes_and_site_rejoins(fed: cl.Cluster, tmp_path: Path) -> None:
    """Kill a site (SuperNode, SuperExec, ClientApp) mid-round 2: round 2 ends with the others,
    the site's lambda is kept; it comes back with a new registered key, so under a new node id
    the server has never seen, is re-queried, and trains again in round 3."""
    lost = "webcam"
    timeout_s = 150
    run_dir = tmp_path / "run"
    old_ids = {n["node-id"] for n in fed.nodes()}
    # The site's machine will come back reinstalled, with a new key the operator registers
    # beforehand; its old node id stays silent until the SuperLink declares it offline (~45 s),
    # which leaves the new SuperNode time to connect before round 3 starts.
    fed.new_key(lost, f"{lost}-reinstalled")
    # Two exchanges a round: the kill below is timed by rows, and with one exchange a round a
    # row is written one exchange later (its evaluation comes with the next round's training).
    extra = "server.eval_in_train=false"
    run_id = fed.submit(f"{OVERRIDES} rounds=3 server.round_timeout_s={timeout_s} {extra}", run_dir)
    fed.wait_for(lambda: len(_rows(run_dir)) >= 2, 600, "round 1 done")  # rows 0 and 1
    time.sleep(1.0)  # round 2's train messages are out
    fed.stop_site(lost)  # SIGKILL to the SuperNode, its SuperExec and its ClientApp
    t_kill = time.monotonic()
    fed.start_site(lost)
    fed.wait_for(lambda: len(_rows(run_dir)) >= 3, 2 * timeout_s + 120, "round 2 done")
    round2_s = time.monotonic() - t_kill
    status = fed.wait_run(run_id, 600)
    assert status == "finished:completed", f"{status}\n{fed.log(run_id)[-4000:]}"
    new_ids = {n["node-id"] for n in fed.nodes() if n["status"] == "online"} - old_ids
    assert len(new_ids) == 1, "the returning site should have a new node id"
    rows = _rows(run_dir)
    check_metrics_contract(rows, 3, down={2: {lost}})
    r1, r2, r3 = rows[1], rows[2], rows[3]
    assert set(r1["clients"]) == set(TRAIN)
    assert set(r2["clients"]) == set(TRAIN) - {lost}, r2["clients"].keys()
    # its weight is kept (not dropped or reset); see the report on how much EG moves it
    assert r2["lambda"][lost] > 0 and r3["lambda"][lost] > 0
    assert round2_s < 2 * timeout_s + 60, round2_s  # train and evaluate each bounded
    assert set(r3["clients"]) == set(TRAIN), f"{lost} did not rejoin: {r3['clients'].keys()}"
    assert r3["replied"] == r3["sent"] == len(TRAIN)


@pytest.mark.slow
@pytest.mark.multihost
def test_killed_server_resumes_from_checkpoint(fed: cl.Cluster, tmp_path: Path) -> None:
    """Kill the SuperLink with its ServerApp after round 1, restart it on its database (the
    registered keys survive, the sites reconnect on their own) and resume from the run folder:
    round 2 follows round 1 and nothing is repeated."""
    run_dir = tmp_path / "run"
    run_id = fed.submit(OVERRIDES, run_dir)
    fed.wait_for(lambda: len(_rows(run_dir)) >= 2, 600, "round 1 done")
    fed.superlink.kill(signal.SIGKILL)
    assert len(_rows(run_dir)) < 3
    fed.start_superlink()
    fed.wait_for(lambda: fed.online() == len(fed.sources), 180, "sites reconnect")
    resumed = _run(fed, "", f"resume={run_dir}", timeout=600)
    assert resumed != run_id
    check_metrics_contract(_rows(run_dir), 2)
    assert (run_dir / "done").exists()


def test_netns_skip_reason_is_explicit(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    assert "iproute2" in (cl.why_no_netns() or "")
    monkeypatch.setattr(shutil, "which", lambda _: "/usr/sbin/ip")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in (cl.why_no_netns() or "")


# ---- docker-compose.yml itself, under podman-compose ---------------------------------------
COMPOSE_OVERRIDES = (  # experiment=deploy on all six sites of the file, at experiment=tiny's size
    "experiment=deploy rounds=1 data.scale=0.08 data.num_frames=4 data.size=32 model.width=4 "
    "train.batch_size=8 train.loss_before_clips=8 eval.batch_size=32 server.heldout_adapt=[none]"
)


def _flwr_json(env: dict[str, str], *args: str) -> dict:
    r = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    start = r.stdout.find("{")
    assert start >= 0, f"flwr {' '.join(args)}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout[start:])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.multihost
def test_compose_file_runs_a_federation_under_podman(tmp_path: Path) -> None:
    """docker-compose.yml's 20 services (SuperLink, ServerApp executor, six SuperNodes with
    their ClientApp executors and warm workers; TLS, node authentication, process isolation)
    come up under podman-compose on a base image built here (testbed/podman.py) and finish a
    one-round federation that writes the metrics contract for its five training sites and
    phone; every site's worker log shows it ran that run's messages."""
    from testbed import podman

    reason = podman.why_no_podman()
    if reason:
        pytest.skip(f"compose under podman: {reason}")
    conf = podman.containers_conf(tmp_path / "containers.conf")
    env = {**_env(tmp_path / "flwr-home"), "CONTAINERS_CONF": str(conf)}
    podman.ensure_image(tmp_path, env)
    port = _free_port()
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(yaml.safe_dump(podman.local_compose(port), sort_keys=False))
    nodes = [x for s in podman.SITES for x in ("--node", s)]
    assert make_certs(["--out", str(tmp_path / "certs"), "--san", "superlink", *nodes]) == 0
    project = f"hdf{os.getpid()}"
    compose = ["podman-compose", "-p", project, "-f", str(compose_file)]

    def sh(cmd: list[str], timeout: float = 600) -> None:
        subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True, timeout=timeout)

    try:
        sh([*compose, "up", "-d", "superlink"])
        deadline = time.monotonic() + 120
        probe = ["bash", "-c", f"echo > /dev/tcp/127.0.0.1/{port}"]
        while subprocess.run(probe, capture_output=True).returncode:
            assert time.monotonic() < deadline, "the SuperLink container did not open its port"
            time.sleep(1)
        time.sleep(3)  # the port is published before the SuperLink inside listens
        connection = [str(BIN / "python"), str(ROOT / "deploy" / "connection.py"), "hdf-docker"]
        sh([*connection, "--address", f"127.0.0.1:{port}", "--ca", str(tmp_path / "certs/ca.crt")])
        for site in podman.SITES:
            key = str(tmp_path / "certs" / "nodes" / f"{site}.pub")
            assert _flwr_json(env, "supernode", "register", key, "hdf-docker").get("success")
        sh([*compose, "up", "-d"])
        cfg = f"overrides='{COMPOSE_OVERRIDES}' run-dir='/runs/fed'"
        run_id = int(_flwr_json(env, "run", ".", "hdf-docker", "--run-config", cfg)["run-id"])
        deadline, status = time.monotonic() + 900, ""
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(5)
            runs = _flwr_json(env, "ls", "hdf-docker", "--run-id", str(run_id))["runs"]
            status = str(runs[0]["status"])
        assert status == "finished:completed", f"{status}; container logs: {tmp_path / 'logs'}"
        run_dir = podman.volume_path(project, "runs", env) / "fed"
        rows = _rows(run_dir)
        assert [r["round"] for r in rows] == [0, 1]
        training = set(podman.SITES) - {HELDOUT}
        assert set(rows[1]["train"]) == training and set(rows[1]["heldout"]) == {HELDOUT}
        assert set(rows[1]["clients"]) == training and rows[1]["replied"] == 5
        assert "heldout_eval: clients" in (run_dir / "config.yaml").read_text()
        for site in podman.SITES:  # each site's messages were run by its warm worker
            kind = "evaluate" if site == HELDOUT else "train"
            name = f"{project}_worker-{site.replace('_', '')}_1"  # podman-compose's naming
            log = subprocess.run(
                ["podman", "logs", name], env=env, capture_output=True, text=True
            )  # fmt: skip
            done = f"{kind} message of run {run_id} done"
            assert done in log.stdout + log.stderr, f"{name}: no '{done}'\n{log.stderr[-3000:]}"
    finally:  # every container's log kept in tmp_path/logs, then everything of `project` removed
        (tmp_path / "logs").mkdir()
        ps = ["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={project}"]
        for name in subprocess.run(
            [*ps, "--format", "{{.Names}}"], env=env, capture_output=True, text=True
        ).stdout.split():
            with open(tmp_path / "logs" / f"{name}.log", "w") as log:
                subprocess.run(["podman", "logs", name], env=env, stdout=log, stderr=log)
        subprocess.run([*compose, "down"], env=env, cwd=tmp_path, capture_output=True)
        for kind in ("volume", "network"):
            names = subprocess.run(
                ["podman", kind, "ls", "-q"], env=env, capture_output=True, text=True
            ).stdout.split()
            mine = [n for n in names if n.startswith(f"{project}_")]
            if mine:
                subprocess.run(["podman", kind, "rm", "-f", *mine], env=env, capture_output=True)
