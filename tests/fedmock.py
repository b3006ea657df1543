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


def instruction(node_id: int, content: RecordDict | None = None, kind: str = MessageType.TRAIN) -> Message:
    _identity()
    return Message(content=content or RecordDict({K.CONFIG: ConfigRecord({})}), dst_node_id=node_id, message_type=kind)


def train_reply(
    node_id: int, arrays: dict[str, np.ndarray], *, source: int, loss_before: float = 1.0,
    num_examples: int = 10, train_loss: float = 1.0,
) -> Message:
    """A client's train reply as the contract says (DESIGN.md section 3)."""
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
