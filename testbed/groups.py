"""Stopping processes started in their own process group (`start_new_session=True`): the test
rigs' SuperLinks, SuperNodes and Ray nodes, each with the children it spawned."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from contextlib import suppress


def stop_process_groups(procs: Sequence[subprocess.Popen], wait_s: float) -> None:
    """SIGTERM every group still running (in reverse start order), give each `wait_s` seconds to
    exit, then SIGKILL the group of any that did not."""
    for proc in reversed(procs):
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
