"""A site's warm worker: one long-lived process that runs the ClientApp's handlers.

    python -m client.worker --socket STATE/worker/worker.sock [--stop-with PID] [--max-sites 2]

Flower 1.42 starts a fresh ClientApp process for every deployed message, which pays torch's
import, the site's data and model build and torch's first-call set-up each time (about 3.3 CPU
s for r3d_18, docs/deploy.md). This process keeps them: the ClientApp (`client.app`, node config
`worker-socket`) forwards each message over a Unix socket (`client.worker_link` says the
frames), and the worker runs the same `client.handlers` functions on its cached site
(`client.site.get_site`, keyed by the run config and the node config the request carries).

Security: the socket is created mode 0600 in a folder the site's user owns that nobody else may
write to; a peer running as another user is refused (SO_PEERCRED); requests are Flower
protobufs and JSON inside bounded frames, never pickles. One request at a time. A request
from a ClientApp whose code differs from the worker's (`worker_link.code_version`) is refused,
and that ClientApp runs the message itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from types import FrameType

from flwr.app import Context, Message

from client import handlers, site
from client import worker_link as link
from hdf import contract as K

log = logging.getLogger("client.worker")
STOP_POLL_S = 2.0  # how often a worker started with --stop-with looks for its process
REQUEST_TIMEOUT_S = 300.0  # reading a request or sending a reply (a local socket: seconds)
_MAX_PATH = 107  # sockaddr_un's sun_path, less its terminating NUL


class WorkerSetupError(RuntimeError):
    """The socket cannot be made safely where asked; the message says why and the fix."""


def _check_folder(folder: Path) -> None:
    """The socket's folder must be the site's own: owned by this user, writable by no one else
    (else another user could replace the socket)."""
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise WorkerSetupError(f"{folder} is not a folder (a link or a file); give a real folder")
    if info.st_uid != os.getuid():
        raise WorkerSetupError(
            f"{folder} is owned by uid {info.st_uid}, not by this site's uid {os.getuid()}; "
            "put the socket in a folder of the site's own"
        )
    if info.st_mode & 0o022:
        raise WorkerSetupError(
            f"{folder} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): "
            f"chmod 700 {folder}"
        )


def listen(path: Path) -> socket.socket:
    """A listening socket at `path` (mode 0600; its folder made 0700 if missing and checked).
    A stale socket file is replaced; a live worker already there is an error."""
    path = path.absolute()
    if len(os.fsencode(path)) > _MAX_PATH:
        raise WorkerSetupError(f"socket path {path} is over {_MAX_PATH} bytes; use a shorter one")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_folder(path.parent)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise WorkerSetupError(f"{path} exists and is not a socket; remove it or pick another")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise WorkerSetupError(f"a worker already listens on {path}")
        except OSError:
            path.unlink()  # stale: left by a worker that was killed
        finally:
            probe.close()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(8)
    return server


def run(kind: str, msg: Message, context: Context) -> tuple[dict, list[bytes]]:
    """The handler's reply header and frames (the handler is the one the ClientApp runs)."""
    if kind == "query":
        cfg_yaml = str(msg.content[K.CONFIG][K.RUN_CONFIG])
        return {
            "ok": True,
            "answer": handlers.query_answer(cfg_yaml, dict(context.node_config)),
        }, []
    reply = getattr(handlers, kind)(msg, context)
    return {"ok": True}, link.records_frames(reply.content, context.state)


def handle(conn: socket.socket, uid: int) -> None:
    """Serve one connection: one request, one reply. Nothing raised here stops the worker."""
    conn.settimeout(REQUEST_TIMEOUT_S)
    try:
        link.check_peer(conn, uid)
        kind, msg, context = link.recv_request(conn)
    except (PermissionError, link.FrameError) as err:
        log.warning("request refused: %s", err)
        with contextlib.suppress(OSError):
            link.send_header(conn, {"ok": False, "refused": str(err)})
        return
    except OSError as err:
        log.warning("request not read: %s", err)
        return
    try:
        header, frames = run(kind, msg, context)
        log.info("%s message of run %s done", kind, context.run_id)
    except Exception as err:  # the ClientApp raises it, as Flower expects
        log.warning(
            "%s message of run %s raised %s: %s", kind, context.run_id, type(err).__name__, err
        )
        header, frames = link.error_header(err), []
    try:
        link.send_header(conn, header)
        link.send_frames(conn, frames)
    except OSError as err:
        log.warning(
            "the reply to a %s message was not delivered (%s); the ClientApp reruns it", kind, err
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (a reused pid): not the one we watch
        return False
    return True


def serve(server: socket.socket, uid: int, stop_with: int | None = None) -> None:
    """Answer connections one at a time; return once process `stop_with` (the SuperNode's
    script) has gone, so a killed SuperNode leaves no worker behind."""
    server.settimeout(None if stop_with is None else STOP_POLL_S)
    while stop_with is None or _alive(stop_with):
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        with conn:
            handle(conn, uid)
    log.info("process %d has stopped: the worker stops too", stop_with)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def parser() -> argparse.ArgumentParser:
    """The command line (also what tests/test_deploy.py checks docker-compose.yml's workers by).
    Flags are taken whole only: a command that works by abbreviation breaks with a new flag."""
    p = argparse.ArgumentParser(
        prog="python -m client.worker",
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
    )
    p.add_argument("--socket", required=True, type=Path, help="the socket to listen on")
    p.add_argument("--stop-with", type=int, metavar="PID", help="stop when this process has")
    p.add_argument(
        "--max-sites",
        type=int,
        default=2,
        help="sites (run configs) kept built; the oldest is dropped",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.max_sites < 1:
        p.error(f"--max-sites {args.max_sites}: keep at least 1")
    site.MAX_SITES = args.max_sites
    try:
        link.max_frame()  # a bad HDF_WORKER_MAX_FRAME stops the worker now, not each message
        server = listen(args.socket)
    except (ValueError, WorkerSetupError) as err:
        print(f"client.worker: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    # the code it serves with, taken now: ClientApps of other code are refused (worker_link)
    code = link.code_version()
    print(
        f"client.worker: listening on {args.socket.absolute()} (pid {os.getpid()}, "
        f"code {code[:12]})",
        flush=True,
    )
    try:
        serve(server, os.getuid(), args.stop_with)
    finally:
        server.close()
        with contextlib.suppress(OSError):
            args.socket.absolute().unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
