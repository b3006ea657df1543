"""Build Flower messages outside a run (Flower 1.42 needs a task identity for that)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hdf import contract as K


def _identity() -> None:
    # Internal API: Message() refuses to build without a run id outside a Flower process.
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


def instruction(
    node_id: int, content: RecordDict | None = None, kind: str = MessageType.TRAIN
) -> Message:
    _identity()
    return Message(
        content=content or RecordDict({K.CONFIG: ConfigRecord({})}),
        dst_node_id=node_id,
        message_type=kind,
    )


def train_reply(
    node_id: int,
    arrays: dict[str, np.ndarray],
    *,
    source: int,
    loss_before: float = 1.0,
    num_examples: int = 10,
    train_loss: float = 1.0,
) -> Message:
    """A client's train reply as the contract says (docs/design.md §3)."""
    metrics = MetricRecord(
        {
            K.NUM_EXAMPLES: num_examples,
            K.SOURCE_INDEX: source,
            K.LOSS_BEFORE: loss_before,
            K.TRAIN_LOSS: train_loss,
            K.TRAIN_UAR: 0.5,
            K.TRAIN_WAR: 0.5,
            K.SKIPPED_CLIPS: 0,
        }
    )
    content = RecordDict({K.ARRAYS: ArrayRecord([]), K.METRICS: metrics})
    content[K.ARRAYS] = arrays_record(arrays)
    return Message(content=content, reply_to=instruction(node_id))


def arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def eval_reply(node_id: int, *, source: int, loss: float, uar: float = 0.5) -> Message:
    """A client's evaluate reply: loss, UAR, WAR, per-class recall, source and count."""
    metrics = {
        K.NUM_EXAMPLES: 10,
        K.SOURCE_INDEX: source,
        K.LOSS: loss,
        K.UAR: uar,
        K.WAR: uar,
    }
    metrics.update({f"{K.RECALL_PREFIX}{c}": uar for c in range(7)})
    content = RecordDict({K.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=instruction(node_id, kind=MessageType.EVALUATE))


class FakeGrid:
    """The one Grid method the strategies' configure_* hooks call."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        _identity()
        return list(self.node_ids)


def three_source_strategy(cfg, names: dict[int, str], **extra):
    """The strategy `cfg` (a `strategy` config group) over sources 0, 1, 2 served by nodes 10,
    11, 12 that registered 10, 20 and 30 clips at discovery; `extra` goes to build_strategy."""
    from server.strategy import build_strategy

    s = build_strategy(
        cfg,
        train_sources=[0, 1, 2],
        source_names=names,
        seed=1,
        source_sizes={0: 10, 1: 20, 2: 30},
        **extra,
    )
    for node, src in [(10, 0), (11, 1), (12, 2)]:
        s.register_node(node, src, heldout=False, clips=10 * (src + 1))
    return s
