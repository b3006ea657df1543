"""One exchange of messages with the sites: push them, collect the replies.

Flower's deployed `Grid.send_and_receive` (flwr/superlink/grid/http_grid.py) asks the SuperLink
for replies every 3 s, so every exchange ended up to 3 s after its last reply arrived. This asks
every `poll_s` (`server.reply_poll_s`): one small request each, a few per second.

A reply is visible at the SuperLink as soon as its site starts uploading it, and Flower retries
an object still uploading after 1 s, then 2 s, 4 s, up to 10 s (`pull_objects`,
flwr/supercore/constant.py): a large model's reply waited a second or more for an upload that had
finished. `brisk_object_pulls` retries it every 0.05 s, doubling up to 0.5 s, within Flower's
own overall limit (2 h). hdf-supernode does the same for the sites' pulls of the server's message.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

PULL_BACKOFF_S = 0.05  # first retry of an object still uploading (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.5  # longest retry interval (Flower: 10 s)


def brisk_object_pulls(module: ModuleType) -> None:
    """Make `module`'s `pull_objects` retry unavailable objects briskly (idempotent).

    Only defaults change: a caller passing its own backoff keeps it. The per-object try limit is
    lifted so that Flower's overall time limit, not the shorter intervals, ends a stuck pull.
    """
    pull = getattr(module, "pull_objects", None)
    if not callable(pull) or getattr(pull, "brisk", False):
        return

    def brisk(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", PULL_BACKOFF_S)
        kwargs.setdefault("backoff_cap", PULL_BACKOFF_CAP_S)
        kwargs.setdefault("max_tries_per_object", None)
        return pull(*args, **kwargs)

    brisk.brisk = True  # type: ignore[attr-defined]
    module.pull_objects = brisk  # type: ignore[attr-defined]


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float, poll_s: float
) -> list[Message]:
    """The replies to `messages` that arrived within `timeout` seconds (in arrival order)."""
    brisk_object_pulls(sys.modules[type(grid).__module__])
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return replies
