"""The ClientApp's link to its site's warm worker (`client.worker`), and the frames both speak.

Flower starts a fresh ClientApp process for every deployed message; a site that runs a worker
(node config `worker-socket="PATH"`) keeps torch, its data and its model in that one process,
and the ClientApp only forwards the message (docs/deploy.md, "A warm site worker"). This module
imports neither torch nor the model.

Protocol: a Unix stream socket, one request per connection, every frame an 8-byte big-endian
length and that many bytes, each length checked against a bound before anything is read. A
request is a JSON header `{"protocol": 2, "kind": "train"|"evaluate"|"query", "code": digest}`
(`code_version`: a worker refuses a request from other code than its own), the message
(its metadata) and the context (node config, run config) as Flower's own protobufs, then their
records (the message's content, the context's state). A reply is a JSON header (`ok`; a query's
`answer`; a handler's `error`, or why the worker `refused` the request), then for train and
evaluate the reply's content and the context's new state. Records travel as Flower's RecordDict
protobufs without their arrays' bytes, which follow as frames of their own. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import socket
import struct
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.app.message import make_message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

WORKER_SOCKET = "worker-socket"  # node config: the site's worker socket (unset: no worker)
WORKER_TIMEOUT = "worker-timeout"  # node config: seconds to wait for a reply (default below)
DEFAULT_TIMEOUT_S = 3600.0  # a message's whole training; a hung worker is given up after it
CONNECT_TIMEOUT_S = 5.0
MAX_FRAME_ENV = "HDF_WORKER_MAX_FRAME"  # bytes; both sides read it
DEFAULT_MAX_FRAME = 1 << 30  # r3d_18 packed fp32 is 133 MB, its kept Adam state twice that
MAX_HEADER = 1 << 20  # a JSON header: a kind, a query's answer or an error with its traceback
PROTOCOL = 2  # 2: the request header names the code that sent it
CODE_PACKAGES = ("hdf", "client")  # what a handler runs, on either side of the socket
CODE_DEPENDENCIES = ("torch", "torchvision", "flwr", "numpy")
KINDS = ("train", "evaluate", "query")
_LENGTH = struct.Struct(">Q")
_OWN_PACKAGES = ("hdf", "client")  # error classes rebuilt beyond the built-in ones
_said: set[str] = set()


class FrameError(ValueError):
    """A frame that is oversize or not what the protocol says."""


class PeerClosed(ConnectionError):
    """The other side closed the connection in the middle of a frame."""


class RemoteError(RuntimeError):
    """A handler error in the worker whose class cannot be rebuilt here (named in the text)."""


# ---- frames -----------------------------------------------------------------------------------
def max_frame() -> int:
    """The bound on a frame's length: `HDF_WORKER_MAX_FRAME` bytes, default 1 GiB."""
    raw = os.environ.get(MAX_FRAME_ENV, "")
    if not raw:
        return DEFAULT_MAX_FRAME
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_FRAME_ENV}={raw!r} is not a positive number of bytes")
    return value


def send_frames(sock: socket.socket, frames: list[bytes]) -> None:
    for frame in frames:
        sock.sendall(_LENGTH.pack(len(frame)))
        sock.sendall(frame)


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise PeerClosed(f"{what}: the connection closed after {got} of {n} bytes")
        got += k
    return buf


def recv_frame(sock: socket.socket, limit: int, what: str) -> bytearray:
    """One frame of at most `limit` bytes (FrameError naming the bound when it is longer)."""
    (n,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size, what))
    if n > limit:
        raise FrameError(
            f"{what}: a frame of {n} bytes is over the bound of {limit} bytes; if a model "
            f"really is that big, raise {MAX_FRAME_ENV} for both the SuperNode and the worker"
        )
    return _recv_exact(sock, n, what)


def send_header(sock: socket.socket, header: dict[str, Any]) -> None:
    send_frames(sock, [json.dumps({"protocol": PROTOCOL, **header}).encode()])


def recv_header(sock: socket.socket, what: str) -> dict[str, Any]:
    raw = recv_frame(sock, MAX_HEADER, what)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FrameError(f"{what}: the header frame is not JSON ({err})") from None
    if not isinstance(header, dict) or header.get("protocol") != PROTOCOL:
        raise FrameError(
            f"{what}: the header is not protocol {PROTOCOL} (got {str(header)[:200]}); "
            "the ClientApp and the worker must run the same code"
        )
    return header


def _parse(proto: Any, raw: bytes, what: str) -> Any:
    try:
        return proto.FromString(bytes(raw))
    except DecodeError as err:
        raise FrameError(f"{what}: not a {proto.__name__} protobuf ({err})") from None


def _hollow(records: RecordDict) -> tuple[RecordDict, list[bytes]]:
    """`records` with every Array's bytes left out (dtype, shape and stype kept), and those
    bytes in order. Flower's protobufs copy a bytes field once per level of nesting (measured:
    about 1 CPU s to serialise r3d_18's 133 MB), so the bytes travel as frames of their own."""
    shell, blobs = RecordDict(), []
    for key, record in records.items():
        if isinstance(record, ArrayRecord):
            empty = {}
            for name, a in record.items():
                empty[name] = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=b"")
                blobs.append(a.data)
            record = ArrayRecord(empty)
        shell[key] = record
    return shell, blobs


def _recv_shell(sock: socket.socket, what: str) -> RecordDict:
    raw = recv_frame(sock, max_frame(), what)
    try:
        return recorddict_from_proto(_parse(ProtoRecordDict, raw, what))
    except (ValueError, TypeError) as err:  # a protobuf that parses but holds no RecordDict
        raise FrameError(f"{what}: not a RecordDict ({err})") from None


def _fill(shell: RecordDict, sock: socket.socket, what: str) -> None:
    """Put back the bytes of every Array of `shell`, one frame each, in the order sent."""
    limit = max_frame()
    for key, record in list(shell.items()):
        if not isinstance(record, ArrayRecord):
            continue
        arrays = {}
        for name, a in record.items():
            if a.data:
                raise FrameError(f"{what}: array {key}/{name} came with its bytes inside")
            data = bytes(recv_frame(sock, limit, f"{what} array {key}/{name}"))
            arrays[name] = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=data)
        shell[key] = ArrayRecord(arrays)


def records_frames(*records: RecordDict) -> list[bytes]:
    """Frames of RecordDicts: each one's protobuf without array bytes, then all the bytes."""
    hollow = [_hollow(r) for r in records]
    shells = [recorddict_to_proto(shell).SerializeToString() for shell, _ in hollow]
    return shells + [blob for _, blobs in hollow for blob in blobs]


def recv_records(sock: socket.socket, what: str, count: int) -> list[RecordDict]:
    """`count` RecordDicts as `records_frames` sent them; FrameError on anything else."""
    shells = [_recv_shell(sock, f"{what} {i}") for i in range(count)]
    for i, shell in enumerate(shells):
        _fill(shell, sock, f"{what} {i}")
    return shells


# ---- the peer ---------------------------------------------------------------------------------
def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end (Linux SO_PEERCRED: pid, uid, gid)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def check_peer(sock: socket.socket, uid: int) -> None:
    """PermissionError unless the other end runs as `uid` (the site's own user)."""
    other = peer_uid(sock)
    if other != uid:
        raise PermissionError(f"the peer runs as uid {other}, not as the site's uid {uid}")


# ---- which code answers ----------------------------------------------------------------------
def source_digest(roots: Iterable[Path], versions: dict[str, str]) -> str:
    """SHA-256 over every .py file under `roots` (its path below its root and its bytes, in
    sorted order) and the `versions` of the dependencies."""
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            rel = f"{root.name}/{path.relative_to(root).as_posix()}".encode()
            data = path.read_bytes()
            h.update(b"%d:%s%d:" % (len(rel), rel, len(data)) + data)
    for name, version in sorted(versions.items()):
        h.update(f"{name}={version};".encode())
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def code_version() -> str:
    """The code this process runs a handler with: the sources of `hdf` and `client` and the
    versions of torch, torchvision, flwr and numpy, hashed (no package is imported for it).

    The ClientApp runs the code `flwr run` sent (the FAB); a worker runs what it was started
    from (the site's checkout, or its image). After a code change one of them may be stale,
    and its replies would come from code the run never sent; the worker refuses such a
    request and the ClientApp runs it itself, with a warning saying to restart the worker."""
    roots = []
    for name in CODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name!r} is not importable here")
        roots.append(Path(next(iter(spec.submodule_search_locations))))
    return source_digest(roots, {d: _version(d) for d in CODE_DEPENDENCIES})


class CodeMismatch(FrameError):
    """A request from a ClientApp that runs other code than this worker."""


# ---- requests (the worker's side reads them) --------------------------------------------------
def request_frames(kind: str, msg: Message, context: Context) -> list[bytes]:
    """A request: header, the message and context without their records, then the records
    (the message's content, the context's state)."""
    header = json.dumps({"protocol": PROTOCOL, "kind": kind, "code": code_version()}).encode()
    bare_msg = make_message(metadata=msg.metadata, content=RecordDict())
    bare_ctx = dataclasses.replace(context, state=RecordDict())
    return [
        header,
        message_to_proto(bare_msg).SerializeToString(),
        context_to_proto(bare_ctx).SerializeToString(),
        *records_frames(msg.content, context.state),
    ]


def recv_request(sock: socket.socket) -> tuple[str, Message, Context]:
    """A request's kind, message and context; FrameError on anything else, CodeMismatch
    for a request from other code than this process's."""
    header = recv_header(sock, "request")
    kind = header.get("kind")
    if kind not in KINDS:
        raise FrameError(f"request: kind {kind!r} is not one of {', '.join(KINDS)}")
    limit = max_frame()
    msg = _parse(ProtoMessage, recv_frame(sock, limit, "request message"), "request message")
    ctx = _parse(ProtoContext, recv_frame(sock, limit, "request context"), "request context")
    try:
        bare_msg, bare_ctx = message_from_proto(msg), context_from_proto(ctx)
    except (ValueError, TypeError) as err:
        raise FrameError(f"request: the message or context does not decode ({err})") from None
    content, state = recv_records(sock, "request records", 2)
    # checked once all is read, so that the ClientApp gets the refusal and its reason
    theirs, ours = str(header.get("code", "none")), code_version()
    if theirs != ours:
        raise CodeMismatch(
            f"the ClientApp runs other code ({theirs[:12]}) than this worker ({ours[:12]}): the "
            "sources of hdf/client or the torch, torchvision, flwr or numpy versions differ; "
            "restart the site's worker from the code of the run (deploy/supernode.sh "
            "--warm-worker; compose: rebuild the image, docker compose up -d worker-<site>)"
        )
    message = make_message(metadata=bare_msg.metadata, content=content)
    return kind, message, dataclasses.replace(bare_ctx, state=state)


# ---- handler errors cross as their class, module and arguments --------------------------------
def error_header(err: Exception) -> dict[str, Any]:
    """A handler error as JSON: its class, its arguments (as text when not JSON) and trace."""
    args: list[Any] = list(err.args)
    try:
        json.dumps(args)
    except (TypeError, ValueError):
        args = [str(err)]
    trace = "".join(traceback.format_exception(err))[-20000:]
    cls = type(err)
    return {
        "ok": False,
        "error": {"module": cls.__module__, "type": cls.__qualname__, "args": args, "trace": trace},
    }


def rebuild_error(info: dict[str, Any]) -> Exception:
    """The handler's error as it was raised in the worker: the same class (a built-in one or
    this project's) with the same arguments, so Flower's error reply reads the same; else a
    RemoteError naming it. The worker's traceback is attached as a note."""
    module, name = str(info.get("module", "")), str(info.get("type", ""))
    args = info.get("args") if isinstance(info.get("args"), list) else []
    err: Exception | None = None
    if module == "builtins" or module.split(".")[0] in _OWN_PACKAGES:
        try:
            cls: Any = importlib.import_module(module)
            for part in name.split("."):
                cls = getattr(cls, part)
            if isinstance(cls, type) and issubclass(cls, Exception):
                err = cls(*args)
        except Exception:  # any failure to rebuild it: say what it was instead
            err = None
    if err is None:
        err = RemoteError(f"{module}.{name}: {', '.join(str(a) for a in args)}")
    err.add_note(f"raised in the site's warm worker:\n{str(info.get('trace', ''))[-20000:]}")
    return err


# ---- the ClientApp's side ---------------------------------------------------------------------
@dataclass
class Reply:
    """What the worker answered: train/evaluate's content and state, or a query's answer."""

    content: RecordDict | None = None
    state: RecordDict | None = None
    answer: dict[str, Any] | None = None


def _say_once(key: str, text: str) -> None:
    if key not in _said:
        _said.add(key)
        log.warning("%s", text)


def _timeout(node_config: dict[str, Any]) -> float:
    raw = node_config.get(WORKER_TIMEOUT, DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = 0.0
    if not value > 0:
        raise ValueError(
            f"node-config {WORKER_TIMEOUT}={raw!r} is not a positive number of seconds"
        )
    return value


def forward(kind: str, msg: Message, context: Context) -> Reply | None:
    """Run `kind` in the site's worker: its reply, or None when this process must run the
    handler itself (no worker configured or reachable, or one that failed before replying:
    the handlers are deterministic, so the rerun gives the same reply). A handler error in
    the worker is raised here as the same error and is not run again."""
    node_config = dict(context.node_config)
    path = node_config.get(WORKER_SOCKET)
    if not path:
        return None
    path, timeout = str(path), _timeout(node_config)
    frames = request_frames(kind, msg, context)
    limit = max_frame()
    if max(len(f) for f in frames) > limit:
        _say_once(
            "size", f"a {kind} request is over {MAX_FRAME_ENV}={limit} bytes; running it here"
        )
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(path)
            check_peer(sock, os.getuid())
        except OSError as err:  # no socket, refused, not ours: no worker to use
            _say_once(path, f"no warm worker at {path} ({err}); running the handlers here")
            return None
        sock.settimeout(timeout)
        try:
            send_frames(sock, frames)
            header = recv_header(sock, "reply")
            if header.get("ok"):
                if kind == "query":
                    return Reply(answer=header.get("answer"))
                content, state = recv_records(sock, "reply records", 2)
                return Reply(content, state)
        except (OSError, FrameError) as err:  # died, closed, hung or garbled: rerun here
            log.warning(
                "the warm worker at %s failed a %s message (%s); running it here", path, kind, err
            )
            return None
    finally:
        sock.close()
    error = header.get("error")
    if not isinstance(error, dict):  # refused (the handler never ran there), or garbled
        why = header.get("refused", f"a reply header without ok or error: {str(header)[:200]}")
        log.warning(
            "the warm worker at %s refused the %s message (%s); running it here", path, kind, why
        )
        return None
    raise rebuild_error(error)


def apply_state(context: Context, state: RecordDict) -> None:
    """Make `context.state` (the object Flower keeps after the ClientApp returns) what the
    worker's handler left it: its records replaced, the ones it dropped deleted."""
    for key in [k for k in context.state if k not in state]:
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
