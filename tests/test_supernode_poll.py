"""hdf-supernode (deploy/supernode.py): Flower's SuperNode loop with its fixed waits shortened."""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import threading
import time
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, Metadata, RecordDict
from flwr.app.message.message import make_message, remove_content_from_message
from flwr.proto.message_pb2 import PullObjectRequest
from flwr.proto.runtime_pb2 import PullAppMessagesRequest
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.run import Run
from flwr.supernode import start_client_internal as loop
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
from flwr.supernode.servicer.runtime import runtime_handlers

from deploy.supernode import (
    ENV_FAST,
    ENV_REPLY,
    ENV_WINDOW,
    ArrivalGate,
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
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    clock = PollClock(PollPolicy(fast_s=0.25, window_s=1.0), t.monotonic, t.sleep)
    install(loop, clock, ArrivalGate())
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


def _walk(tree: object) -> list[str]:
    return [tree.object_id] + [i for c in tree.children for i in _walk(c)]


@pytest.mark.parametrize("gated", [False, True])
def test_clientapp_asking_early_gets_its_message_once_every_array_arrived(
    gated: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Flower's real `_pull_and_store_message` and the SuperNode's real runtime handlers, with the
    SuperLink faked: the message is stored (and its ClientApp task created) before its arrays are
    pulled. Without the gate a ClientApp asking at once finds every object unavailable (it would
    back off 1 s, 2 s, ...); with it, the request is held until all of them are there."""
    store = InMemoryObjectStore()
    state = InMemoryNodeState(store)
    state.set_node_id(7)
    run = Run.create_empty(5)
    state.store_run(run)  # a known run: no FAB to fetch
    arrays = ArrayRecord([np.arange(1000, dtype=np.float32), np.ones(3, np.float32)])
    meta = Metadata(5, "", 0, 7, "", "1", time.time(), 3600.0, "train")
    msg = make_message(meta, RecordDict({"arrays": arrays}))
    msg.metadata.__dict__["_message_id"] = msg.object_id
    objects = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
    release = threading.Event()

    def pull_object(run_id: int, object_id: str) -> bytes:
        release.wait(5)
        return objects[object_id]

    for name in ("_pull_and_store_message", "time", "pull_objects"):  # undone after the test
        monkeypatch.setattr(loop, name, getattr(loop, name))
    monkeypatch.setattr(runtime_handlers, "pull_messages", runtime_handlers.pull_messages)
    if gated:
        install(loop, PollClock(PollPolicy()), ArrivalGate(), runtime_handlers)
    pulling = threading.Thread(
        target=loop._pull_and_store_message,
        kwargs=dict(
            state=state, object_store=store, node_config={},
            receive=lambda: (remove_content_from_message(msg), get_object_tree(msg)),
            get_run=None, get_fab=None, pull_object=pull_object,
            confirm_message_received=lambda *_: None, trusted_entities=None,
        ),
    )  # fmt: skip
    pulling.start()
    while msg.object_id not in store:  # stored, arrays preregistered, not yet pulled
        time.sleep(0.005)
    threading.Timer(0.2, release.set).start()
    task = SimpleNamespace(run_id=5)
    with caplog.at_level(logging.INFO, logger="flwr"):
        reply = runtime_handlers.pull_messages(PullAppMessagesRequest(), state, task)
    ids = _walk(reply.message_object_trees[0])
    available = [
        runtime_handlers.pull_object(PullObjectRequest(object_id=i), state, task).object_available
        for i in ids
    ]
    release.set()
    pulling.join(5)
    assert len(ids) == len(objects) == 7
    assert available == [gated] * len(ids)
    assert getattr(loop.pull_objects, "brisk", False) == gated  # its own pulls retry briskly
    held = [r.getMessage() for r in caplog.records if "held the ClientApp" in r.getMessage()]
    assert len(held) == int(gated)
    if gated:
        assert float(held[0].split("request ")[1].split(" s")[0]) >= 0.15


def test_gate_lets_a_request_through_at_once_when_nothing_is_pulled() -> None:
    gate = ArrivalGate(max_hold_s=5.0)
    assert gate.wait() < 0.01
    with gate.pulling():
        quick = ArrivalGate(max_hold_s=0.05)
        with quick.pulling():
            assert 0.04 < quick.wait() < 1.0  # bounded: then Flower's own backoff takes over
    assert gate.wait() < 0.01


def test_flower_creates_the_task_before_pulling_the_arrays() -> None:
    """The race the gate closes, in the pinned Flower's source; and the SuperNode's HTTP app looks
    its handlers up at each request, so replacing `pull_messages` on the module takes effect."""
    body = inspect.getsource(loop._pull_and_store_message)
    assert body.index("state.create_task(") < body.index("pull_objects(")
    from flwr.supernode import main

    router = importlib.import_module("flwr.supercore.routers.runtime.router")
    assert main._RUNTIME_HANDLERS is runtime_handlers
    assert "return handlers.pull_messages(request, state, task)" in inspect.getsource(router)
