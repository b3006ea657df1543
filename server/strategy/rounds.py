"""What a strategy's aggregation gives the round loop: typed, read-only results.

The round loop (server/federation.py) reads a round through these and nothing else of the
strategy: the new model, each source's checked numbers, the replies refused and the numbers
replaced (with their reasons, as metrics.jsonl logs them), and the mixing weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from hdf import contract as K


@dataclass(frozen=True)
class Rejection:
    """A reply the server refused (`kind`: train, evaluate or query) and why."""

    round: int
    kind: str
    node: int | None
    source: int | None  # the source the node registered (None: it has none)
    reason: str

    def row(self) -> dict[str, Any]:
        """The entry of a metrics.jsonl row's `rejected` list."""
        return asdict(self)


@dataclass(frozen=True)
class Flag:
    """A number the server replaced, or a result it refused (e.g. a non-finite mix), and why."""

    round: int
    node: int | None
    source: int | None
    reason: str

    def row(self) -> dict[str, Any]:
        """The entry of a metrics.jsonl row's `flagged` list."""
        return asdict(self)


@dataclass(frozen=True)
class TrainRound:
    """One train aggregation.

    arrays : the new global model; None keeps the previous one (too few valid updates, or a
        mix holding NaN or Inf).
    by_source : each source with a valid update -> its checked train metrics.
    update_norm : each such source -> the norm of its accepted update.
    rejected, flagged : this aggregation's refusals and replaced numbers.
    summary : means over the sources (Flower's `aggregate_train` returns it).
    """

    arrays: ArrayRecord | None
    by_source: dict[int, dict[str, float]] = field(default_factory=dict)
    update_norm: dict[int, float] = field(default_factory=dict)
    rejected: tuple[Rejection, ...] = ()
    flagged: tuple[Flag, ...] = ()
    summary: MetricRecord | None = None


@dataclass(frozen=True)
class EvaluateRound:
    """One evaluate aggregation.

    by_source : each source whose reply was accepted -> its checked metrics (plain scores, and
        a held-out site's complete, in-range `adapted-<method>-` scores).
    rejected, flagged : this aggregation's refused replies and replaced numbers.
    weights : each training source's mixing weight after this evaluation (what `lambda`
        logs; FedDG-GA moves its weights here, the others in training).
    summary : validation UAR mean and worst (Flower's `aggregate_evaluate` returns it).
    """

    by_source: dict[int, dict[str, float]]
    rejected: tuple[Rejection, ...]
    flagged: tuple[Flag, ...]
    weights: dict[int, float]
    summary: MetricRecord | None = None


@dataclass(frozen=True)
class SourceReplies:
    """A round's valid train replies in mixing order (source, then node), grouped by source
    once for every strategy that weighs sources."""

    messages: list[Message]
    by_source: dict[int, list[Message]]

    @classmethod
    def of(cls, replies: list[Message]) -> SourceReplies:
        groups: dict[int, list[Message]] = {}
        for m in replies:
            groups.setdefault(int(m.content[K.METRICS][K.SOURCE_INDEX]), []).append(m)
        return cls(list(replies), groups)

    def __len__(self) -> int:
        return len(self.messages)
