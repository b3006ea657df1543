"""`hdf-supernode`: Flower's own `flower-supernode`, polling briskly while a run is active.

Flower 1.42's SuperNode loop (`flwr/supernode/start_client_internal.py`) asks the SuperLink for a
message and, when there is none, sleeps a fixed 3 s; it waits for its ClientApp's reply in fixed
0.5 s steps. A deployed round waits for its slowest site, so with 3 sites each exchange loses
about 2.25 s to the first sleep alone (the expected largest of three uniform waits on [0, 3]),
whatever the model. Neither wait has a setting. This entry point runs Flower's unchanged
SuperNode with the loop module's `time` replaced by `PollClock`, which shortens those two sleeps:
- the idle poll is `fast_s` for `window_s` seconds after the last message this SuperNode pulled
  (and after it started), then Flower's 3 s again, so an idle site costs the SuperLink what it
  always did and a site in the middle of a run answers within `fast_s`;
- the wait for the ClientApp's reply, a check of the SuperNode's own in-memory state, is
  `reply_s`.
It also closes a race: Flower creates the ClientApp's task before it pulls the message's arrays,
so a ClientApp that starts quickly (the warm worker's thin shim does) asks for arrays that are
still arriving and backs off 1 s, then 2 s, 4 s... (`flwr/supercore/inflatable/`).
`ArrivalGate` holds that ClientApp's request for its message until the pull has finished, at most
`MAX_HOLD_S`, and logs each hold, so the ClientApp's first try at every array succeeds. And the
SuperNode's own pull of a message the ServerApp is still uploading retries briskly
(`server.exchange.brisk_object_pulls`), not after Flower's 1 s, 2 s, 4 s.
Every other call passes through to the `time` module. Environment (seconds, positive):
HDF_SUPERNODE_POLL_S (0.2), HDF_SUPERNODE_POLL_WINDOW_S (60; 0 keeps Flower's 3 s idle poll),
HDF_SUPERNODE_REPLY_POLL_S (0.05). tests/test_supernode_poll.py holds the Flower module to the
shape this relies on, so a Flower upgrade that changes it fails there, not at a site.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from server.exchange import brisk_object_pulls

FLOWER_IDLE_SLEEP_S = 3  # the loop's `time.sleep(3)` when no message was pulled
FLOWER_REPLY_SLEEP_S = 0.5  # its `time.sleep(0.5)` while the ClientApp's reply is not there yet
ENV_FAST = "HDF_SUPERNODE_POLL_S"
ENV_WINDOW = "HDF_SUPERNODE_POLL_WINDOW_S"
ENV_REPLY = "HDF_SUPERNODE_REPLY_POLL_S"
# Longest hold of a ClientApp's message request: under Flower's 30 s HTTP timeout
# (flwr/supercore/protobuf/client.py), after which its own backoff takes over as before.
MAX_HOLD_S = 20.0
LOG = logging.getLogger("flwr")


@dataclass(frozen=True)
class PollPolicy:
    """How long the SuperNode loop sleeps, in seconds."""

    fast_s: float = 0.2  # idle poll while a run is active
    window_s: float = 60.0  # "active": a message was pulled at most this long ago
    reply_s: float = 0.05  # wait step for the ClientApp's reply (a local state check)

    def idle_wait(self, since_message_s: float) -> float:
        """The idle poll's sleep, given the time since the last pulled message."""
        return self.fast_s if since_message_s < self.window_s else float(FLOWER_IDLE_SLEEP_S)


def policy_from_env(environ: Mapping[str, str] = os.environ) -> PollPolicy:
    """The policy the environment asks for; a bad value is refused with its name and the fix."""
    default = PollPolicy()
    values: dict[str, float] = {}
    for field, key, lo in (
        ("fast_s", ENV_FAST, 1e-3),
        ("window_s", ENV_WINDOW, 0.0),
        ("reply_s", ENV_REPLY, 1e-3),
    ):
        raw = environ.get(key)
        if raw is None or raw == "":
            values[field] = getattr(default, field)
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and lo <= value <= 3600):
            raise ValueError(
                f"{key}={raw!r} is not a number of seconds in [{lo:g}, 3600]: set it to e.g. "
                f"{getattr(default, field):g}, or unset it for the default"
            )
        values[field] = value
    return PollPolicy(**values)


class PollClock:
    """Stands in for the `time` module inside Flower's SuperNode loop module."""

    def __init__(
        self,
        policy: PollPolicy,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._sleep = sleep
        self.last_message = clock()  # a SuperNode just started is about to be given work

    def message_pulled(self) -> None:
        """Note that the loop just pulled a message: the run is active."""
        self.last_message = self._clock()

    def sleep(self, seconds: float) -> None:
        """Flower's two fixed waits follow the policy; any other sleep is left as it is."""
        if seconds == FLOWER_IDLE_SLEEP_S:
            seconds = self.policy.idle_wait(self._clock() - self.last_message)
        elif seconds == FLOWER_REPLY_SLEEP_S:
            seconds = self.policy.reply_s
        self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class ArrivalGate:
    """Lets a ClientApp's message request through only when no message is being pulled.

    The SuperNode loop handles one message at a time (pull, then wait for the reply, then push),
    so "no pull in progress" means the message the ClientApp asks for has all its arrays.
    """

    def __init__(self, max_hold_s: float = MAX_HOLD_S) -> None:
        self.max_hold_s = max_hold_s
        self._cond = threading.Condition()
        self._pulling = 0

    @contextmanager
    def pulling(self) -> Iterator[None]:
        """Around the loop's pull of a message and its arrays."""
        with self._cond:
            self._pulling += 1
        try:
            yield
        finally:
            with self._cond:
                self._pulling -= 1
                self._cond.notify_all()

    def wait(self) -> float:
        """Block until no pull is in progress (at most `max_hold_s`); the seconds held."""
        start = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: self._pulling == 0, timeout=self.max_hold_s)
        return time.monotonic() - start


def install(
    module: ModuleType, clock: PollClock, gate: ArrivalGate, handlers: ModuleType | None = None
) -> None:
    """Put `clock` into Flower's loop module `module` as its `time`; note every pulled message.

    With `handlers` (the SuperNode's runtime API handlers module, which its HTTP app looks up at
    each request), a ClientApp's message request waits at `gate` for the pull to finish.
    """
    pull = module._pull_and_store_message

    def pull_and_note(*args: Any, **kwargs: Any) -> int | None:
        with gate.pulling():
            run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.message_pulled()
        return run_id

    module.time = clock
    module._pull_and_store_message = pull_and_note
    brisk_object_pulls(module)
    if handlers is None:
        return
    pull_messages = handlers.pull_messages

    def pull_messages_when_arrived(*args: Any, **kwargs: Any) -> Any:
        held = gate.wait()
        if held >= 0.01:
            LOG.info("hdf-supernode: held the ClientApp's request %.2f s for its arrays", held)
        return pull_messages(*args, **kwargs)

    handlers.pull_messages = pull_messages_when_arrived


def main() -> None:
    """Run `flower-supernode` with the flags given, its loop polling by the environment's policy."""
    try:
        policy = policy_from_env()
    except ValueError as err:
        sys.exit(f"hdf-supernode: {err}")
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli import flower_supernode
    from flwr.supernode.servicer.runtime import runtime_handlers

    handlers = (
        runtime_handlers if callable(getattr(runtime_handlers, "pull_messages", None)) else None
    )
    # Not the Flower this was written for: its own waits and backoff, and say so.
    if callable(getattr(loop, "_pull_and_store_message", None)) and hasattr(loop, "time"):
        install(loop, PollClock(policy), ArrivalGate(), handlers)
    else:
        print(
            "hdf-supernode: Flower's SuperNode loop has changed; polling as Flower does",
            file=sys.stderr,
        )
    if handlers is None:
        print(
            "hdf-supernode: Flower's runtime handlers have changed; a ClientApp asking for its "
            "message early backs off as Flower does",
            file=sys.stderr,
        )
    sys.argv[0] = "flower-supernode"  # Flower's argparse names itself after argv[0]
    flower_supernode()


if __name__ == "__main__":
    main()
