"""server.exchange: replies collected by polling until all came or time is up, and objects still
uploading retried briskly."""

import importlib
import inspect
import threading
from types import SimpleNamespace
from typing import ClassVar

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from server.exchange import PULL_BACKOFF_CAP_S, brisk_object_pulls, send_and_receive


class _Grid:
    """Replies to message i arrive at the pull numbered `arrive[i]` (None: never)."""

    def __init__(self, arrive: list[int | None]) -> None:
        self.arrive, self.pulls, self.asked = arrive, 0, []

    def push_messages(self, messages):
        return [f"id{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        self.asked.append(sorted(ids))
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"id{i}"))
            for i, at in enumerate(self.arrive)
            if at == self.pulls and f"id{i}" in ids
        ]


def test_polls_until_every_reply_arrived_asking_only_for_the_missing() -> None:
    grid = _Grid([1, 3, 2])
    replies = send_and_receive(grid, ["a", "b", "c"], timeout=60, poll_s=0.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id0", "id2", "id1"]
    assert grid.pulls == 3
    assert grid.asked == [["id0", "id1", "id2"], ["id1", "id2"], ["id1"]]


def test_stops_at_the_timeout_with_the_replies_it_has() -> None:
    grid = _Grid([1, None])
    replies = send_and_receive(grid, ["a", "b"], timeout=0.05, poll_s=0.01)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id0"]
    assert 2 <= grid.pulls <= 10


class _RecordingEvent(threading.Event):
    """Flower's pull loop sleeps on an Event's wait: record each sleep instead of sleeping it."""

    waits: ClassVar[list[float]] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            return super().wait()
        _RecordingEvent.waits.append(round(timeout, 6))
        return self.is_set()


@pytest.mark.parametrize("brisk", [False, True])
def test_an_object_still_uploading_is_retried_briskly(
    brisk: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower's real `pull_objects` as the deployed grid calls it (object ids and the pull
    function only), an object unavailable twice: Flower retries after 1 s then 2 s, the brisk
    pull after 0.05 s then 0.1 s (jitter off)."""
    module = importlib.import_module("flwr.superlink.grid.http_grid")
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    monkeypatch.setattr(inflatable_utils.random, "uniform", lambda a, b: 0.0)
    monkeypatch.setattr(inflatable_utils.threading, "Event", _RecordingEvent)
    monkeypatch.setattr(_RecordingEvent, "waits", [])
    if brisk:
        brisk_object_pulls(module)
        brisk_object_pulls(module)  # idempotent: one layer
    tries = {"a": 0}

    def pull(object_id: str) -> bytes:
        tries[object_id] += 1
        if tries[object_id] <= 2:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert module.pull_objects(object_ids=["a"], pull_object_fn=pull) == {"a": b"content"}
    assert _RecordingEvent.waits == ([0.05, 0.1] if brisk else [1.0, 2.0])


def test_brisk_pulls_keep_a_callers_own_backoff_and_lift_the_try_limit() -> None:
    calls: list[dict] = []
    module = SimpleNamespace(pull_objects=lambda *a, **kw: calls.append(kw))
    brisk_object_pulls(module)
    module.pull_objects(["x"], pull_object_fn=None, initial_backoff=3.0)
    assert calls == [
        {
            "pull_object_fn": None,
            "initial_backoff": 3.0,
            "backoff_cap": PULL_BACKOFF_CAP_S,
            "max_tries_per_object": None,
        }
    ]


def test_flower_pulls_a_reply_and_a_sites_message_with_its_default_backoff() -> None:
    """What brisk_object_pulls relies on: both callers pass no backoff of their own and call
    `pull_objects` as a module global (a Flower that changes this fails here)."""
    grid = importlib.import_module("flwr.superlink.grid.http_grid")
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    for source in (
        inspect.getsource(grid.HttpGrid.pull_messages),
        inspect.getsource(loop._pull_and_store_message),
    ):
        assert "pull_objects(" in source and "backoff" not in source
    assert inflatable_utils.PULL_INITIAL_BACKOFF == 1


def test_an_exchange_makes_its_grids_object_pulls_brisk(monkeypatch: pytest.MonkeyPatch) -> None:
    """`send_and_receive` installs the brisk pulls for the module its grid comes from (the
    deployed `HttpGrid`'s); a grid module without `pull_objects` (simulation) is left alone."""
    module = importlib.import_module(_Grid.__module__)
    monkeypatch.setattr(module, "pull_objects", lambda *a, **kw: kw, raising=False)
    send_and_receive(_Grid([1]), ["a"], timeout=60, poll_s=0.0)
    assert getattr(module.pull_objects, "brisk", False)
    assert module.pull_objects([])["initial_backoff"] == 0.05
