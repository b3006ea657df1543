"""The warm site worker (client/worker.py) and the ClientApp's link to it (client/worker_link.py):
a warm reply is the cold one bit for bit; anything wrong with the worker falls back to the
handlers in the ClientApp's process, except a handler error, which surfaces as itself."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto

from client import handlers, site, worker, worker_link
from client.app import app
from hdf import contract as K
from hdf.config import compose, model_settings, to_yaml
from hdf.data import build_sources
from hdf.models import build_model
from tests.fedmock import instruction

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "webcam"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    keep = "train.keep_optimizer_state=true"
    cfg = compose(["experiment=tiny", f"data.root={root}", "+train.threads=1", keep])
    source = next(s for s in build_sources(cfg.data) if s.name == SOURCE)
    for split in ("train", "val"):  # cached on disk before a worker reads the same root
        source.split(split)
    return cfg


def start_worker(folder: Path) -> tuple[subprocess.Popen, str]:
    """A worker process and its socket (as deploy/supernode.sh --warm-worker starts one)."""
    sock = str(folder / "worker" / "w.sock")
    env = {**os.environ, "HDF_CACHE": str(folder / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.worker", "--socket", sock], cwd=ROOT, env=env
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"the worker did not start (exit {proc.returncode})")
        time.sleep(0.1)
    return proc, sock


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def warm(cfg, tmp_path_factory):
    proc, sock = start_worker(tmp_path_factory.mktemp("w"))
    yield sock
    stop(proc)


def _message(cfg, round_: int, kind: str = MessageType.TRAIN, arrays: ArrayRecord | None = None):
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    config = ConfigRecord(
        {K.RUN_CONFIG: to_yaml(cfg), K.SERVER_ROUND: round_, K.LOCAL_EPOCHS: 1, K.LR: 1e-3}
    )
    config[K.LOCAL_NORM] = "all"  # the site keeps its norm layers in context.state
    arrays = arrays if arrays is not None else ArrayRecord(model.state_dict())
    return instruction(1, RecordDict({K.ARRAYS: arrays, K.CONFIG: config}), kind)


def _context(sock: str, **extra) -> Context:
    node = {"source": SOURCE, worker_link.WORKER_SOCKET: sock, **extra}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def _bytes(records: RecordDict) -> bytes:
    return recorddict_to_proto(records).SerializeToString(deterministic=True)


def _cold(kind: str, msg, context: Context):
    """The handler as a fresh ClientApp process runs it: no site built before."""
    site._SITES.clear()
    try:
        return getattr(handlers, kind)(msg, context)
    finally:
        site._SITES.clear()


def _not_here(*_args):
    raise AssertionError("the handler ran in the ClientApp's process, not in the worker")


def test_warm_replies_equal_cold_ones_bit_for_bit(cfg, warm, monkeypatch) -> None:
    """Two training rounds and an evaluate, the context's state carried between them: the
    worker (its site built once, trained twice) replies and leaves the state exactly as fresh
    processes do; the ClientApp's own handlers never run."""
    ctx_warm, ctx_cold = _context(warm), _context(warm)
    warm_replies, cold_replies = [], []
    arrays = None
    for round_, kind in ((1, "train"), (2, "train"), (3, "evaluate")):
        msg = _message(cfg, round_, getattr(MessageType, kind.upper()), arrays)
        with monkeypatch.context() as m:
            m.setattr(handlers, kind, _not_here)
            warm_replies.append(app(msg, ctx_warm).content)
        cold_replies.append(_cold(kind, msg, ctx_cold).content)
        assert _bytes(warm_replies[-1]) == _bytes(cold_replies[-1]), f"round {round_} {kind}"
        assert _bytes(ctx_warm.state) == _bytes(ctx_cold.state), f"round {round_} state"
        if kind == "train":
            arrays = warm_replies[-1][K.ARRAYS]
    assert {"local-norm", "optimizer-state"} <= set(ctx_warm.state.keys())
    # the rounds did differ (a reply that ignored its message would pass the equalities)
    assert _bytes(warm_replies[0]) != _bytes(warm_replies[1])
    assert warm_replies[2][K.METRICS][K.SOURCE_INDEX] == 1


def test_a_new_run_config_rebuilds_the_site(cfg, warm, monkeypatch) -> None:
    """The worker keys its site by the run config: another config (here a wider model, whose
    weights the kept site could not load) is built anew and replies as a fresh process does."""
    other = compose(
        ["experiment=tiny", f"data.root={cfg.data.root}", "+train.threads=1", "model.width=8"]
    )
    msg = _message(other, 1, MessageType.EVALUATE)
    with monkeypatch.context() as m:
        m.setattr(handlers, "evaluate", _not_here)
        assert app(_message(cfg, 1, MessageType.EVALUATE), _context(warm)).content
        got = app(msg, _context(warm)).content
    assert _bytes(got) == _bytes(_cold("evaluate", msg, _context(warm)).content)


def test_a_kept_site_gets_its_own_thread_count_back(cfg) -> None:
    """A process keeping two sites (a worker across two runs) sets each one's torch threads
    whenever it is used, not only when it is built: training rounds differently with them."""
    import torch

    two = compose(["experiment=tiny", f"data.root={cfg.data.root}", "+train.threads=2"])
    weights = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    before = torch.get_num_threads()
    site._SITES.clear()
    try:
        for config, threads in ((cfg, 1), (two, 2), (cfg, 1)):
            site.get_site(to_yaml(config), {"source": SOURCE}, weights.state_dict())
            assert torch.get_num_threads() == threads
    finally:
        site._SITES.clear()
        torch.set_num_threads(before)


def test_an_unindexed_query_is_answered_by_the_worker(cfg, warm, monkeypatch, tmp_path):
    """A query the site's index cannot answer goes to the worker, which answers as the
    handlers do here."""
    monkeypatch.setenv("HDF_CACHE", str(tmp_path))  # an empty index
    content = RecordDict({K.CONFIG: ConfigRecord({K.RUN_CONFIG: to_yaml(cfg)})})
    msg = instruction(1, content, MessageType.QUERY)
    with monkeypatch.context() as m:
        m.setattr(handlers, "query_answer", _not_here)
        got = dict(app(msg, _context(warm)).content[K.METRICS])
    want = handlers.query_answer(to_yaml(cfg), {"source": SOURCE})
    assert got[K.SOURCE_INDEX] == want["source"] == 1
    assert got[K.NUM_EXAMPLES] == want["clips"] > 0
    assert got[K.HELDOUT] == 0


@pytest.mark.parametrize("kind", ["missing", "refusing"])
def test_an_unreachable_worker_means_the_handlers_run_here(cfg, tmp_path, caplog, kind):
    """No socket file, or one nobody listens on: the same reply from this process, and the
    reason said once."""
    path = tmp_path / "w.sock"
    if kind == "refusing":
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(path))  # bound, never listening: connect is refused
        dead.close()
    worker_link._said.discard(str(path))
    msg = _message(cfg, 1, MessageType.EVALUATE)
    with caplog.at_level(logging.WARNING, logger="client.worker_link"):
        replies = [app(msg, _context(str(path))).content for _ in range(2)]
    want = _bytes(_cold("evaluate", msg, _context(str(path))).content)
    assert [_bytes(r) for r in replies] == [want, want]
    said = [r.getMessage() for r in caplog.records if "no warm worker" in r.getMessage()]
    assert len(said) == 1 and str(path) in said[0]


class FakeWorker:
    """A socket that misbehaves as a dying, hung or garbling worker would (`act(conn)`)."""

    def __init__(self, path: Path, act) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, args=(act,), daemon=True)
        self.thread.start()

    def _serve(self, act) -> None:
        conn, _ = self.server.accept()
        with conn:
            act(conn)

    def close(self) -> None:
        self.thread.join(timeout=30)
        self.server.close()


def _read_request(conn: socket.socket) -> None:
    worker_link.recv_request(conn)


def _dies_mid_reply(conn: socket.socket) -> None:
    _read_request(conn)
    worker_link.send_header(conn, {"ok": True})
    conn.sendall(struct.pack(">Q", 1000) + b"x" * 10)  # then the process is gone


def _oversize_reply(conn: socket.socket) -> None:
    _read_request(conn)
    worker_link.send_header(conn, {"ok": True})
    conn.sendall(struct.pack(">Q", 1 << 40))


def _hangs(conn: socket.socket) -> None:
    _read_request(conn)
    time.sleep(3)


@pytest.mark.parametrize(
    ("act", "why"),
    [
        (lambda conn: None, "Broken pipe|connection closed|reset"),  # accepted, then gone
        (_dies_mid_reply, "connection closed after 10 of 1000 bytes"),
        (_oversize_reply, "over the bound"),
        (_hangs, "timed out"),
    ],
)
def test_a_worker_failing_mid_message_means_the_handlers_run_here(
    cfg, tmp_path, caplog, act, why
) -> None:
    path = tmp_path / "w.sock"
    fake = FakeWorker(path, act)
    msg = _message(cfg, 1, MessageType.TRAIN)
    try:
        with caplog.at_level(logging.WARNING, logger="client.worker_link"):
            ctx = _context(str(path), **{worker_link.WORKER_TIMEOUT: 1.0})
            got = app(msg, ctx)
    finally:
        fake.close()
    cold_ctx = _context(str(path))
    assert _bytes(got.content) == _bytes(_cold("train", msg, cold_ctx).content)
    assert _bytes(ctx.state) == _bytes(cold_ctx.state)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "failed a train message" in said and re.search(why, said)


def test_a_worker_killed_mid_message_means_the_handlers_run_here(cfg, tmp_path) -> None:
    """A real worker, stopped while the message is on its way and then killed: the ClientApp,
    waiting for the reply, sees the connection close and runs the message itself."""
    proc, sock = start_worker(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGSTOP)  # the connection waits in its backlog
        killer = threading.Timer(1.0, os.kill, (proc.pid, signal.SIGKILL))
        killer.start()
        msg = _message(cfg, 1, MessageType.EVALUATE)
        got = app(msg, _context(sock)).content
        killer.join()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _bytes(got) == _bytes(_cold("evaluate", msg, _context(sock)).content)


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        ("missing-key", RuntimeError, "Missing key"),
        ("bad-layout", "PackingError", "layout"),
        ("no-round", KeyError, "server-round"),
    ],
)
def test_a_handler_error_surfaces_as_itself_and_is_not_rerun(
    cfg, warm, monkeypatch, bad, exc, match
) -> None:
    """A model missing a key, a malformed packed layout, a message without its round: the
    ClientApp raises the error the handler raised in the worker (same class, same text, so
    Flower's error reply is the same) and does not run the message again itself."""
    from hdf.packing import PackingError, layout_record, pack

    exc = PackingError if exc == "PackingError" else exc
    msg = _message(cfg, 1, MessageType.TRAIN)
    if bad == "missing-key":
        arrays = dict(msg.content[K.ARRAYS])
        del arrays[next(iter(arrays))]
        msg.content[K.ARRAYS] = ArrayRecord(arrays)
    elif bad == "bad-layout":  # a packed model whose layout names one array too few
        state = {k: v.numpy() for k, v in msg.content[K.ARRAYS].to_torch_state_dict().items()}
        buffer, entries = pack(state)
        layout = layout_record(entries, False)
        layout[K.LAYOUT_NAMES] = layout[K.LAYOUT_NAMES][:-1]
        msg.content[K.ARRAYS] = ArrayRecord({K.PACKED: Array(buffer)})
        msg.content[K.LAYOUT] = ConfigRecord(layout)
    else:
        del msg.content[K.CONFIG][K.SERVER_ROUND]
    with pytest.raises(exc, match=match) as cold:
        _cold("train", msg, _context(warm))
    with monkeypatch.context() as m:
        m.setattr(handlers, "train", _not_here)
        with pytest.raises(exc, match=match) as got:
            app(msg, _context(warm))
    assert type(got.value) is type(cold.value)
    assert str(got.value) == str(cold.value)
    assert any("warm worker" in note for note in got.value.__notes__)


def test_an_error_class_not_rebuilt_here_is_named() -> None:
    err = worker_link.rebuild_error({"module": "somewhere.else", "type": "Odd", "args": ["x"]})
    assert isinstance(err, worker_link.RemoteError)
    assert str(err) == "somewhere.else.Odd: x"


# ---- frames ---------------------------------------------------------------------------------
def _pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    return a, b


def test_an_oversize_frame_is_refused_before_it_is_read(monkeypatch) -> None:
    """The length is checked first: a frame of 1 TiB is refused naming the bound and the
    variable that sets it; one byte over a bound set by that variable too."""
    a, b = _pair()
    with a, b:
        a.sendall(struct.pack(">Q", 1 << 40))
        with pytest.raises(worker_link.FrameError, match=r"1099511627776 bytes.*1073741824"):
            worker_link.recv_frame(b, worker_link.max_frame(), "test")
    monkeypatch.setenv(worker_link.MAX_FRAME_ENV, "100")
    assert worker_link.max_frame() == 100
    a, b = _pair()
    with a, b:
        worker_link.send_frames(a, [b"y" * 100, b"z" * 101])
        assert worker_link.recv_frame(b, worker_link.max_frame(), "test") == b"y" * 100
        with pytest.raises(worker_link.FrameError, match=r"101 bytes .* 100 bytes.*MAX_FRAME"):
            worker_link.recv_frame(b, worker_link.max_frame(), "test")
    monkeypatch.setenv(worker_link.MAX_FRAME_ENV, "lots")
    with pytest.raises(ValueError, match="HDF_WORKER_MAX_FRAME='lots'"):
        worker_link.max_frame()


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([b"\xff not json"], "header frame is not JSON"),
        ([b'{"protocol": 1, "kind": "train"}'], "not protocol 2"),
        ([b"[1, 2]"], "not protocol 2"),
        ([b'{"protocol": 2, "kind": "fit"}'], "kind 'fit' is not one of train, evaluate, query"),
        ([b'{"protocol": 2, "kind": "train"}', b"\x0a\xff\xff"], "not a Message protobuf"),
    ],
)
def test_a_malformed_request_is_a_clear_error(frames, match) -> None:
    a, b = _pair()
    with a, b:
        worker_link.send_frames(a, frames)
        with pytest.raises(worker_link.FrameError, match=match):
            worker_link.recv_request(b)


def _received(frames: list[bytes]):
    """`recv_request` of `frames` sent by another thread (they may not fit a socket's buffer)."""
    a, b = _pair()
    with a, b:

        def send() -> None:
            with contextlib.suppress(OSError):  # the reader stopped at a bad frame
                worker_link.send_frames(a, frames)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            return worker_link.recv_request(b)
        finally:
            b.close()  # a sender still writing gets an error, not a wait
            sender.join(timeout=30)


def test_records_carry_array_bytes_only_in_frames_of_their_own(cfg) -> None:
    """The records' protobufs hold no array bytes (those follow, one frame per array, as
    sent); a protobuf that carries them inside is refused, as is a frame that is no RecordDict."""
    import numpy as np

    state = RecordDict({"kept": ArrayRecord({"a": Array(np.arange(3.0)), "b": Array(np.ones(2))})})
    msg = _message(cfg, 1, MessageType.TRAIN)
    ctx = Context(run_id=7, node_id=3, node_config={"source": SOURCE}, state=state, run_config={})
    frames = worker_link.request_frames("train", msg, ctx)
    arrays = len(msg.content[K.ARRAYS]) + 2
    assert len(frames) == 5 + arrays
    kept = [state["kept"][k].data for k in ("a", "b")]
    assert frames[-2:] == kept  # the state's arrays, last and in order
    assert not any(blob in frame for blob in kept for frame in frames[:5])  # not in the shells
    kind, got_msg, got_ctx = _received(frames)
    assert (kind, got_ctx.run_id, got_ctx.node_id, dict(got_ctx.node_config)) == (
        "train", 7, 3, {"source": SOURCE},
    )  # fmt: skip
    assert _bytes(got_msg.content) == _bytes(msg.content)
    assert _bytes(got_ctx.state) == _bytes(state)
    assert got_msg.metadata == msg.metadata
    full = recorddict_to_proto(state).SerializeToString()  # bytes inside: not hollow
    for shell, match in ((full, "came with its bytes inside"), (b"\x0a\xff", "not a RecordDict")):
        with pytest.raises(worker_link.FrameError, match=match):
            _received([*frames[:4], shell, *frames[5:-2]])


def test_a_truncated_frame_is_a_closed_connection() -> None:
    a, b = _pair()
    with b:
        with a:
            a.sendall(struct.pack(">Q", 50) + b"x" * 20)
        with pytest.raises(worker_link.PeerClosed, match="after 20 of 50 bytes"):
            worker_link.recv_frame(b, 100, "test")


def test_the_worker_refuses_garbage_and_keeps_serving(cfg, warm) -> None:
    """A garbled request gets a `refused` reply saying why; the next request is served."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(warm)
        worker_link.send_frames(s, [b'{"protocol": 2, "kind": "train"}', b"\x0a\xff\xff"])
        header = worker_link.recv_header(s, "reply")
    assert header["ok"] is False and "not a Message protobuf" in header["refused"]
    assert worker_link.forward("evaluate", _message(cfg, 1, "evaluate"), _context(warm))


def test_a_clientapp_of_other_code_is_refused_and_runs_the_message_itself(
    cfg, warm, monkeypatch, caplog
) -> None:
    """A ClientApp whose code differs from the worker's (a stale worker after a code change)
    gets a refusal that says so and how to fix it, and runs the handler itself: the reply is
    the cold one. The worker keeps serving the ClientApps of its own code."""
    msg = _message(cfg, 1, MessageType.EVALUATE)
    monkeypatch.setattr(worker_link, "code_version", lambda: "f" * 64)
    with caplog.at_level(logging.WARNING, logger="client.worker_link"):
        assert worker_link.forward("evaluate", msg, _context(warm)) is None
        reply = app(msg, _context(warm)).content
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert said and "runs other code (ffffffffffff)" in said[0] and "restart" in said[0]
    assert _bytes(reply) == _bytes(_cold("evaluate", msg, _context(warm)).content)
    monkeypatch.undo()
    assert worker_link.forward("evaluate", msg, _context(warm)) is not None


def test_the_code_version_follows_every_source_byte_and_dependency(tmp_path) -> None:
    """Any change to a .py file of the packages (a byte, a name, a new module) or to a
    dependency's version changes the digest; caches and other files do not."""
    pkg = tmp_path / "hdf"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    versions = {"torch": "2.14.1"}
    base = worker_link.source_digest([pkg], versions)
    assert base == worker_link.source_digest([pkg], dict(versions))  # stable
    (pkg / "sub" / "b.cpython-311.pyc").write_bytes(b"\0")
    (pkg / "notes.md").write_text("not code")
    assert worker_link.source_digest([pkg], versions) == base
    assert worker_link.source_digest([pkg], {"torch": "2.15.0"}) != base
    (pkg / "a.py").write_text("x = 2\n")
    assert worker_link.source_digest([pkg], versions) != base
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").rename(pkg / "sub" / "c.py")
    assert worker_link.source_digest([pkg], versions) != base
    (pkg / "sub" / "c.py").rename(pkg / "sub" / "b.py")
    assert worker_link.source_digest([pkg], versions) == base
    (pkg / "new.py").write_text("")
    assert worker_link.source_digest([pkg], versions) != base
    # this checkout's own: both packages, the installed versions
    assert re.fullmatch(r"[0-9a-f]{64}", worker_link.code_version())


# ---- who may connect ------------------------------------------------------------------------
def test_a_peer_of_another_uid_is_refused() -> None:
    """SO_PEERCRED: the worker answers a peer that is not its own user with a refusal (here the
    worker is told to serve uid + 1, as a process of another user would look to it)."""
    a, b = _pair()
    with a, b:
        served = threading.Thread(target=worker.handle, args=(a, os.getuid() + 1))
        served.start()
        header = worker_link.recv_header(b, "reply")
        served.join(timeout=30)
    assert header["ok"] is False
    assert f"uid {os.getuid()}, not as the site's uid {os.getuid() + 1}" in header["refused"]
    a, b = _pair()
    with a, b:
        worker_link.check_peer(b, os.getuid())  # the same user passes
        with pytest.raises(PermissionError, match="not as the site's uid"):
            worker_link.check_peer(b, os.getuid() + 1)


SYSTEM_PYTHON = "/usr/bin/python3"  # one another user may run (the venv may sit in root's home)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason=f"switching to another user needs root, and {SYSTEM_PYTHON} for that user",
)
def test_another_user_cannot_open_the_socket() -> None:
    """A process of another user (nobody) cannot connect: the socket's folder is 0700, and
    with that folder opened up to 0755 the socket itself is still 0600."""
    base = Path(tempfile.mkdtemp(prefix="hdf-worker-"))
    try:
        base.chmod(0o755)  # others may reach the worker's folder, as a site's state folder
        path = base / "w" / "w.sock"
        server = worker.listen(path)
        probe = "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"

        def as_nobody() -> subprocess.CompletedProcess:
            return subprocess.run(
                [SYSTEM_PYTHON, "-c", probe, str(path)],
                user=65534,
                capture_output=True,
                text=True,
                cwd="/",
            )

        with server:
            assert path.parent.stat().st_mode & 0o777 == 0o700
            assert path.stat().st_mode & 0o777 == 0o600
            for folder_mode in (0o700, 0o755):
                path.parent.chmod(folder_mode)
                r = as_nobody()
                assert r.returncode != 0 and "Permission denied" in r.stderr, folder_mode
            path.chmod(0o666)  # the check itself: a socket open to all lets nobody in
            assert as_nobody().returncode == 0
    finally:
        shutil.rmtree(base)


def test_the_socket_folder_must_be_the_sites_own(tmp_path) -> None:
    """A folder others may write to is refused (they could swap the socket); a stale socket
    left by a killed worker is replaced; a live worker's socket is not taken over."""
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(worker.WorkerSetupError, match=r"writable by others.*chmod 700"):
        worker.listen(loose / "w.sock")
    own = tmp_path / "own"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    own.mkdir(mode=0o700)
    stale.bind(str(own / "w.sock"))
    stale.close()  # a socket file nobody listens on
    live = worker.listen(own / "w.sock")
    try:
        with pytest.raises(worker.WorkerSetupError, match="already listens"):
            worker.listen(own / "w.sock")
    finally:
        live.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(worker.WorkerSetupError, match="not a socket"):
        worker.listen(tmp_path / "file")


# ---- started beside the SuperNode -----------------------------------------------------------
def test_a_worker_stops_when_the_process_it_serves_has(tmp_path) -> None:
    """--stop-with PID: the worker leaves once that process (the SuperNode's script) is gone,
    and removes its socket."""
    parent = subprocess.Popen(["sleep", "600"])
    sock = tmp_path / "w" / "w.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "client.worker",
            "--socket",
            str(sock),
            "--stop-with",
            f"{parent.pid}",
        ],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sock.exists() and proc.poll() is None
        parent.kill()
        parent.wait()
        assert proc.wait(timeout=60) == 0
        assert not sock.exists()
    finally:
        for p in (parent, proc):
            if p.poll() is None:
                p.kill()
                p.wait()


FAKE_SUPERNODE = """#!/bin/sh
echo "$@" > "$(dirname "$0")/args"
echo $$ > "$(dirname "$0")/pid"
exec sleep 600
"""


def test_supernode_script_runs_a_worker_beside_the_supernode(tmp_path) -> None:
    """deploy/supernode.sh --warm-worker (with a stand-in hdf-supernode that records its
    flags): the worker listens on STATE/worker/worker.sock, the SuperNode's node config names
    it, and stopping the script (SIGTERM, as a service manager does) stops both."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "hdf-supernode").write_text(FAKE_SUPERNODE)
    (fake / "hdf-supernode").chmod(0o755)
    for name in ("key", "ca.crt"):
        (tmp_path / name).write_text("x")
    state = tmp_path / "state"
    env = {
        **os.environ,
        "VENV": str(tmp_path / "no-venv"),  # the stand-in first on PATH, then the real python
        "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    flags = ["--superlink", "x:9092", "--source", SOURCE, "--data-root", f"{tmp_path}/data"]
    flags += ["--key", f"{tmp_path}/key", "--ca", f"{tmp_path}/ca.crt", "--state", str(state)]
    script = subprocess.Popen(
        ["bash", str(ROOT / "deploy" / "supernode.sh"), *flags, "--warm-worker"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    sock = state / "worker" / "worker.sock"
    try:
        deadline = time.monotonic() + 120
        while not (sock.exists() and (fake / "args").exists()) and time.monotonic() < deadline:
            assert script.poll() is None, "the script exited"
            time.sleep(0.1)
        assert sock.exists(), "no worker socket"
        args = (fake / "args").read_text()
        assert f'worker-socket="{sock}"' in args and f'source="{SOURCE}"' in args
        assert state.joinpath("worker").stat().st_mode & 0o777 == 0o700
        script.terminate()
        assert script.wait(timeout=60) != 0  # the stand-in SuperNode was killed by the signal
        with pytest.raises(ProcessLookupError):  # and is gone, not left running
            os.kill(int((fake / "pid").read_text()), 0)
        deadline = time.monotonic() + 60
        while sock.exists() and time.monotonic() < deadline:  # the worker unlinks it as it stops
            time.sleep(0.1)
        assert not sock.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)
        script.wait()
