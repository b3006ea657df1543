"""One exchange of messages with the sites: push them, collect the replies.

Flower's deployed `Grid.send_and_receive` (flwr/superlink/grid/http_grid.py) asks the SuperLink
for replies every 3 s, so every exchange ended up to 3 s after its last reply arrived. This asks
every `poll_s` (`server.reply_poll_s`): one small request each, a few per second.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float, poll_s: float
) -> list[Message]:
    """The replies to `messages` that arrived within `timeout` seconds (in arrival order)."""
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
