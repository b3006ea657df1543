"""A ClientApp that misreports on purpose: the project's handlers, then a named tampering.

`misbehaving_app(plan)` answers as `client.app` does, except where `plan` names a misbehaviour
for (partition id, message kind, server round); round None means every round. The real handlers
run first, so a lie is told about real numbers (loss x100 is 100 times the true loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import app as honest
from client.wire import received, reply_records
from hdf import contract as K

# (partition id, "train" | "evaluate" | "query", server round or None) -> misbehaviour name
Plan = dict[tuple[int, str, int | None], str]


def _scale_arrays(arrays: ArrayRecord, fn: Callable[[np.ndarray], np.ndarray]) -> ArrayRecord:
    out = {}
    for key, a in arrays.items():
        v = a.numpy()
        out[key] = Array(np.array(fn(v)) if v.dtype.kind == "f" else v)  # keeps 0-d arrays 0-d
    return ArrayRecord(out)


def _truncate_first(arrays: ArrayRecord) -> ArrayRecord:
    out = {}
    for i, (key, a) in enumerate(arrays.items()):
        v = a.numpy()
        out[key] = Array(v.reshape(-1)[:-1].copy() if i == 0 else v)
    return ArrayRecord(out)


def _set(key: str, fn: Callable[[float], float]) -> Callable[[RecordDict, int], None]:
    def apply(content: RecordDict, other: int) -> None:
        m = content[K.METRICS]
        m[key] = fn(float(m[key]))

    return apply


def _set_arrays(fn: Callable[[ArrayRecord], ArrayRecord]) -> Callable[[RecordDict, int], None]:
    """Tamper with the model a reply carries; a packed reply (the default wire) is unpacked,
    tampered with and packed again as the site packs, so the lie reaches the server's checks
    (scaling the packed uint8 buffer would change nothing: it is not a float array)."""

    def apply(content: RecordDict, other: int) -> None:
        if K.LAYOUT not in content.config_records:
            content[K.ARRAYS] = fn(content[K.ARRAYS])
            return
        got = received(content)
        if got.wire != "float32":  # a 16-bit reply holds deltas, not the model
            raise ValueError(f"the misbehaving client tampers float32 replies, got {got.wire}")
        model = ArrayRecord({k: Array(v.numpy()) for k, v in got.state.items()})
        content.update(reply_records(fn(model).to_torch_state_dict(), got))

    return apply


def _forge(content: RecordDict, other: int) -> None:
    content[K.METRICS][K.SOURCE_INDEX] = other


def _forge_marked(content: RecordDict, other: int) -> None:
    """Claim another source with numbers no real evaluation gives (so overwriting shows)."""
    m = content[K.METRICS]
    m[K.SOURCE_INDEX] = other
    m[K.LOSS] = FORGED_LOSS


def _drop_metrics(content: RecordDict, other: int) -> None:
    del content[K.METRICS]


def _loss_x(factor: float) -> Callable[[RecordDict, int], None]:
    def apply(content: RecordDict, other: int) -> None:
        m = content[K.METRICS]
        for key in (K.LOSS_BEFORE, K.LOSS_BEFORE_BALANCED):
            m[key] = float(m[key]) * factor

    return apply


FORGED_LOSS = 0.012345
MISBEHAVIOURS: dict[str, Callable[[RecordDict, int], None]] = {
    "loss_x100": _loss_x(100.0),
    "loss_x1e6": _loss_x(1e6),
    "loss_negative": _set(K.LOSS_BEFORE, lambda x: -x),
    "loss_nan": _set(K.LOSS_BEFORE, lambda x: math.nan),
    "balanced_nan": _set(K.LOSS_BEFORE_BALANCED, lambda x: math.nan),
    "num_examples_1e12": _set(K.NUM_EXAMPLES, lambda x: 1e12),
    "weights_nan": _set_arrays(lambda a: _scale_arrays(a, lambda v: v * np.nan)),
    "weights_x1000": _set_arrays(lambda a: _scale_arrays(a, lambda v: v * 1000)),
    "wrong_shape": _set_arrays(_truncate_first),
    "forge_source": _forge,
    "forge_marked": _forge_marked,
    "eval_nan": _set(K.LOSS, lambda x: math.nan),
    "no_metrics": _drop_metrics,
}


def misbehaving_app(plan: Plan, other_source: Callable[[int], int]) -> ClientApp:
    """The project's ClientApp with `plan`'s misbehaviours; a forged source index is
    `other_source(own source index)`."""
    for name in plan.values():
        if name not in MISBEHAVIOURS:
            raise ValueError(f"unknown misbehaviour {name!r}; known: {sorted(MISBEHAVIOURS)}")
    app = ClientApp()

    def tamper(kind: str, rnd: int, content: RecordDict, context: Context) -> None:
        pid = int(context.node_config["partition-id"])
        name = plan.get((pid, kind, rnd)) or plan.get((pid, kind, None))
        if name is not None:
            own = int(content[K.METRICS][K.SOURCE_INDEX])
            MISBEHAVIOURS[name](content, other_source(own))

    def round_of(msg: Message) -> int:
        return int(msg.content[K.CONFIG].get(K.SERVER_ROUND, 0))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest.train(msg, context)
        if not reply.has_error() and K.EVAL_METRICS in reply.content.metric_records:
            # one exchange a round: the received model's (round r - 1) scores ride in the reply
            folded = RecordDict({K.METRICS: reply.content[K.EVAL_METRICS]})
            tamper("evaluate", round_of(msg) - 1, folded, context)
            if K.METRICS in folded.metric_records:
                reply.content[K.EVAL_METRICS] = folded[K.METRICS]
            else:
                del reply.content[K.EVAL_METRICS]
        tamper("train", round_of(msg), reply.content, context)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        reply = honest.evaluate(msg, context)
        tamper("evaluate", round_of(msg), reply.content, context)
        return reply

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        reply = honest.query(msg, context)
        tamper("query", 0, reply.content, context)
        return reply

    return app


def main(argv: list[str]) -> int:
    """`python -m tests.misbehaving_client PID:KIND:NAME[:ROUND] ... [Hydra overrides]`: one
    simulation with the named misbehaviours (a forged source is the next training source)."""
    from hdf.config import compose
    from hdf.data import build_sources
    from server.app import open_run
    from simulations.run import simulate

    plan: Plan = {}
    while argv and argv[0].count(":") >= 2:
        pid, kind, name, *rnd = argv.pop(0).split(":")
        plan[(int(pid), kind, int(rnd[0]) if rnd else None)] = name
    cfg = compose(argv)
    run = open_run(cfg)
    print(f"run folder: {run.path}", flush=True)
    k = len(build_sources(cfg.data))
    simulate(cfg, run, misbehaving_app(plan, lambda own: (own + 1) % k))
    print(run.path, flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
