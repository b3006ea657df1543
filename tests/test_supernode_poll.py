"""hdf-supernode (deploy/supernode.py): Flower's SuperNode loop with its fixed waits shortened."""

from __future__ import annotations

import ast
import inspect
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from flwr.supernode import start_client_internal as loop

from deploy.supernode import (
    ENV_FAST,
    ENV_REPLY,
    ENV_WINDOW,
    PollClock,
    PollPolicy,
    install,
    policy_from_env,
)


class FakeTime:
    """A clock that only moves when slept on; records every sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_flower_loop_has_the_waits_this_shortens() -> None:
    """The pinned Flower's loop module sleeps 3 s when idle and 0.5 s for a reply, through its
    module-level `time`, and calls `_pull_and_store_message` as a module global: what `install`
    replaces. A Flower that changes any of this fails here."""
    tree = ast.parse(inspect.getsource(loop))
    sleeps = Counter(
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) == "time.sleep"
        and isinstance(node.args[0], ast.Constant)
    )
    assert sleeps == Counter({3: 1, 0.5: 2})
    body = ast.unparse(
        next(n for n in tree.body if getattr(n, "name", "") == "start_client_internal")
    )
    assert "run_id = _pull_and_store_message(" in body
    assert "if run_id is None:\n" in body and "time.sleep(3)" in body


def test_clock_polls_fast_inside_the_window_and_as_flower_outside() -> None:
    t = FakeTime()
    clock = PollClock(PollPolicy(fast_s=0.25, window_s=1.0, reply_s=0.05), t.monotonic, t.sleep)
    for _ in range(6):
        clock.sleep(3)
    assert t.slept == [0.25, 0.25, 0.25, 0.25, 3.0, 3.0]  # started at 0: window until 1.0
    clock.message_pulled()
    clock.sleep(3)
    clock.sleep(0.5)  # waiting for the ClientApp's reply
    clock.sleep(1.7)  # any other sleep is left alone
    assert t.slept[6:] == [0.25, 0.05, 1.7]
    assert clock.perf_counter is not None  # the rest of `time` passes through


def test_installed_clock_drives_flowers_own_loop(monkeypatch) -> None:
    """Flower's real `start_client_internal` (connection, state and push replaced by fakes):
    its idle sleeps follow the policy, and a pulled message restarts the fast window."""
    t = FakeTime()
    pulls = iter([None] * 6 + [7, None])

    class Stop(Exception):
        pass

    def pull(**_: object) -> int | None:
        try:
            return next(pulls)
        except StopIteration:
            raise Stop from None

    @contextmanager
    def connection(**_: object):
        yield (1, None, None, None, None, None, None, None)

    monkeypatch.setattr(loop, "_init_connection", connection)
    monkeypatch.setattr(loop, "_pull_and_store_message", pull)
    monkeypatch.setattr(loop, "_push_messages", lambda **_: None)
    monkeypatch.setattr(loop, "register_signal_handlers", lambda **_: None)
    monkeypatch.setattr(loop, "time", loop.time)  # undone after the test, as install's changes
    install(loop, PollClock(PollPolicy(fast_s=0.25, window_s=1.0), t.monotonic, t.sleep))
    state = SimpleNamespace(set_node_id=lambda _: None)
    factory = SimpleNamespace(
        state=lambda: state, objectstore_factory=SimpleNamespace(store=lambda: None)
    )
    with pytest.raises(Stop):
        loop.start_client_internal(
            state_factory=factory, server_address="x:1", node_config={}, insecure=True,
            isolation="process",
        )  # fmt: skip
    assert t.slept == [0.25, 0.25, 0.25, 0.25, 3.0, 3.0, 0.25]


def test_policy_from_env_defaults_values_and_refusals() -> None:
    assert policy_from_env({}) == PollPolicy()
    env = {ENV_FAST: "0.5", ENV_WINDOW: "0", ENV_REPLY: "0.1"}
    assert policy_from_env(env) == PollPolicy(fast_s=0.5, window_s=0.0, reply_s=0.1)
    assert PollPolicy(window_s=0.0).idle_wait(0.0) == 3.0  # a zero window: Flower's 3 s always
    for key, bad in ((ENV_FAST, "0"), (ENV_WINDOW, "-1"), (ENV_REPLY, "nan"), (ENV_FAST, "fast")):
        with pytest.raises(ValueError, match=key):
            policy_from_env({key: bad})
