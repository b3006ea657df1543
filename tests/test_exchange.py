"""server.exchange.send_and_receive: replies collected by polling, until all came or time is up."""

from types import SimpleNamespace

from server.exchange import send_and_receive


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
