"""Check every client reply before the server uses it (docs/design.md §6).

Every number a client reports is untrusted. A reply is rejected, with the node and the reason, when
it carries an error, misses a record or a metric, holds a metric that is not a finite number in its
range, names a source other than the one its node registered, has missing, extra or misshapen
arrays, a wrong dtype, a non-finite value, or an update norm far beyond the global model's or the
recently accepted ones. The round goes on with the rest.

Numbers the server can check against its own view are not rejected but flagged and replaced: a
per-round `num-examples` that differs from the size registered at discovery (`size_flag`), and a
`loss-before` far above the server-seen validation loss of the same model (`bounded_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from hdf import contract as K
from hdf.classes import NUM_CLASSES
from hdf.packing import PackingError
from server.arrays import BLOCK, array_view, unpack_record

# No honest cross-entropy comes near this (uniform guessing over 7 classes is 1.95; a confidently
# wrong float32 model stays in the tens): a larger loss is a lie or an overflow, not a measurement.
LOSS_MAX = 1e4
# An update is (update - global model). One larger than GLOBAL_NORM_FACTOR times the global model
# itself is no local training; this reference exists from the first reply on (issue 12 item 3).
GLOBAL_NORM_FACTOR = 10.0
# An update norm above NORM_OUTLIER_FACTOR times the median of the recently accepted norms and
# this round's is rejected, once there are at least NORM_MEDIAN_MIN of them.
NORM_OUTLIER_FACTOR = 10.0
NORM_MEDIAN_MIN = 3
NORM_HISTORY = 20  # accepted update norms the strategy remembers (checkpointed)


@dataclass(frozen=True)
class Bound:
    """The range of one metric: lo <= value <= hi, an integer if `integer`, or exactly `absent`
    (a marker the contract gives a meaning, e.g. recall -1 for a class absent from the split)."""

    lo: float
    hi: float = math.inf
    integer: bool = False
    absent: float | None = None

    def problem(self, key: str, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric {key!r} is not a number: {value!r}"
        x = float(value)
        if not math.isfinite(x):
            return f"metric {key!r} is not finite: {value!r}"
        if self.absent is not None and x == self.absent:
            return None
        if not self.lo <= x <= self.hi:
            return f"metric {key!r} = {value!r} is outside [{self.lo:g}, {self.hi:g}]"
        if self.integer and x != math.floor(x):
            return f"metric {key!r} = {value!r} is not a whole number"
        return None


LOSS = Bound(0.0, LOSS_MAX)
SIGNED_LOSS = Bound(
    -LOSS_MAX, LOSS_MAX
)  # HDF's train loss: its weighted contrastive term can be < 0
SHARE = Bound(0.0, 1.0)
COUNT = Bound(1.0, integer=True)
INDEX = Bound(0.0, integer=True)
FLAG = Bound(0.0, 1.0, integer=True)
RECALL = Bound(0.0, 1.0, absent=-1.0)

Spec = dict[str, Bound]
TRAIN_REQUIRED: Spec = {
    K.NUM_EXAMPLES: COUNT,
    K.SOURCE_INDEX: INDEX,
    K.LOSS_BEFORE: LOSS,
    K.TRAIN_LOSS: SIGNED_LOSS,
}
TRAIN_OPTIONAL: Spec = {
    K.LOSS_BEFORE_BALANCED: LOSS,
    K.LOCAL_VAL_LOSS: LOSS,
    K.TRAIN_UAR: SHARE,
    K.TRAIN_WAR: SHARE,
    K.SKIPPED_CLIPS: Bound(0.0, integer=True),
}
# the scores of one model on one split, as a metrics.jsonl row shows them
SCORES: Spec = {
    K.LOSS: LOSS,
    K.UAR: SHARE,
    K.WAR: SHARE,
    **{f"{K.RECALL_PREFIX}{c}": RECALL for c in range(NUM_CLASSES)},
}
EVAL_REQUIRED: Spec = {K.NUM_EXAMPLES: COUNT, K.SOURCE_INDEX: INDEX, **SCORES}
EVAL_OPTIONAL: Spec = {K.LOSS_BALANCED: LOSS}
QUERY_REQUIRED: Spec = {K.SOURCE_INDEX: INDEX, K.NUM_EXAMPLES: COUNT, K.HELDOUT: FLAG}
QUERY_OPTIONAL: Spec = {K.NUM_PARTITIONS: Bound(0.0, integer=True)}


def check_metrics(
    metrics: MetricRecord, required: Spec, optional: Spec | None = None
) -> str | None:
    """Why `metrics` break the spec (a required key missing, a value out of its bound), or None."""
    missing = [k for k in required if k not in metrics]
    if missing:
        return f"metrics miss {missing}"
    for spec in (required, optional or {}):
        for k, bound in spec.items():
            if k in metrics and (why := bound.problem(k, metrics[k])) is not None:
                return why
    return None


def known_metrics(metrics: MetricRecord, *specs: Spec) -> dict[str, float]:
    """The checked metrics as floats (other keys a client added are not carried further)."""
    return {k: float(metrics[k]) for spec in specs for k in spec if k in metrics}


def _metrics(msg: Message) -> tuple[MetricRecord | None, str | None]:
    """The reply's metrics record, or why there is none to read."""
    if msg.has_error():
        return None, f"client error: {msg.error.reason}"
    if K.METRICS not in msg.content.metric_records:
        return None, f"no MetricRecord {K.METRICS!r} in the reply"
    return msg.content[K.METRICS], None


def unpack_reply(msg: Message, sent: ArrayRecord | None) -> str | None:
    """Unpack a packed train reply's arrays in place (`server.arrays.unpack_record`; `sent`:
    the model that node was sent), so every later check reads plain arrays; or why its packed
    arrays cannot be read (a layout that disagrees with its buffer, an unknown dtype, a buffer
    larger than the model sent). Unpacked and error replies pass unchanged."""
    content = None if msg.has_error() else msg.content
    if content is None or K.LAYOUT not in content.config_records:
        return None
    if K.ARRAYS not in content.array_records:
        return f"a {K.LAYOUT!r} record but no ArrayRecord {K.ARRAYS!r} in the reply"
    try:
        content[K.ARRAYS] = unpack_record(content[K.ARRAYS], content[K.LAYOUT], sent)
    except (PackingError, ValueError, TypeError) as err:
        return f"malformed packed arrays: {err}"
    return None


def _source_problem(msg: Message, src: int, node_source: dict[int, int]) -> str | None:
    node = msg.metadata.src_node_id
    if node not in node_source:
        return "the node never registered a source (no accepted query reply)"
    if node_source[node] != src:
        return f"reports source {src} but registered as source {node_source[node]}"
    return None


def _reason(
    msg: Message,
    reference: ArrayRecord | None,
    train_sources: set[int],
    node_source: dict[int, int],
) -> str | None:
    """Why a train reply cannot be used (before its norm is known), or None."""
    metrics, why = _metrics(msg)
    if metrics is None:
        return why
    content = msg.content
    if K.ARRAYS not in content.array_records:
        return f"no ArrayRecord {K.ARRAYS!r} in the reply"
    if (why := check_metrics(metrics, TRAIN_REQUIRED, TRAIN_OPTIONAL)) is not None:
        return why
    src = int(metrics[K.SOURCE_INDEX])
    if src not in train_sources:
        return f"unknown or non-training source index {src}"
    if (why := _source_problem(msg, src, node_source)) is not None:
        return why
    arrays = content[K.ARRAYS]
    if reference is not None:
        if set(arrays.keys()) != set(reference.keys()):
            extra = sorted(set(arrays.keys()) - set(reference.keys()))[:3]
            lost = sorted(set(reference.keys()) - set(arrays.keys()))[:3]
            return f"array keys differ from the global model's (missing {lost}, extra {extra})"
        for key, ref in reference.items():
            a = arrays[key]
            if tuple(a.shape) != tuple(ref.shape):
                return f"array {key!r} has shape {tuple(a.shape)}, expected {tuple(ref.shape)}"
            if a.dtype != ref.dtype:
                return f"array {key!r} has dtype {a.dtype}, expected {ref.dtype}"
    return None


def evaluate_reply_problem(msg: Message, node_source: dict[int, int]) -> str | None:
    """Why an evaluate reply cannot be logged or used (issue 12 item 4), or None."""
    metrics, why = _metrics(msg)
    if metrics is None:
        return why
    if (why := check_metrics(metrics, EVAL_REQUIRED, EVAL_OPTIONAL)) is not None:
        return why
    return _source_problem(msg, int(metrics[K.SOURCE_INDEX]), node_source)


def adapted_spec(method: str) -> Spec:
    """A held-out site's scores after test-time adaptation `method` (`adapted-<method>-<key>`),
    bounded as the plain ones."""
    return {K.adapted_key(method, k): bound for k, bound in SCORES.items()}


def adapted_methods(metrics: MetricRecord) -> list[str]:
    """The adaptation methods an evaluate reply holds any `adapted-<method>-` key of."""
    keys = [k for k in metrics if k.startswith(K.ADAPTED_PREFIX)]
    return sorted({k[len(K.ADAPTED_PREFIX) :].split("-", 1)[0] for k in keys})


def evaluate_metrics(metrics: MetricRecord) -> tuple[dict[str, float], dict[str, str]]:
    """(the checked numbers of an evaluate reply `evaluate_reply_problem` accepted, {method: why
    its adapted scores were left out}). A method's adapted scores are kept only when all of
    them are there and in range; a bad set drops itself, not the reply's plain scores."""
    specs = [EVAL_REQUIRED, EVAL_OPTIONAL]
    dropped: dict[str, str] = {}
    for method in adapted_methods(metrics):
        spec = adapted_spec(method)
        if (why := check_metrics(metrics, spec)) is None:
            specs.append(spec)
        else:
            dropped[method] = why
    return known_metrics(metrics, *specs), dropped


def query_reply(msg: Message, heldout_sources: set[int], num_sources: int) -> dict[str, int] | str:
    """A query reply as {source, heldout, clips, partitions}, or why it cannot be believed.

    Whether a source is held out is the server's config, not the node's word: a reply that says
    otherwise runs another config (or lies) and is refused.
    """
    metrics, why = _metrics(msg)
    if metrics is None:
        return str(why)
    if (why := check_metrics(metrics, QUERY_REQUIRED, QUERY_OPTIONAL)) is not None:
        return why
    src = int(metrics[K.SOURCE_INDEX])
    if src >= num_sources:
        return f"source index {src} is not a source of this run (it has {num_sources})"
    heldout = int(metrics[K.HELDOUT])
    if heldout != int(src in heldout_sources):
        return (
            f"says source {src} is {'' if heldout else 'not '}held out; the run's config disagrees"
        )
    return {
        "source": src,
        "heldout": heldout,
        "clips": int(metrics[K.NUM_EXAMPLES]),
        "partitions": int(metrics.get(K.NUM_PARTITIONS, 0)),
    }


# ---- numbers checked against the server's own view ------------------------------------------
def size_flag(reported: float, registered: int) -> str | None:
    """Why a round's `num-examples` is not used for weighting (it differs from the size the node
    registered at discovery, which is), or None."""
    if reported == registered:
        return None
    return (
        f"num-examples {reported:g} differs from the {registered} clips registered at "
        f"discovery; weighting uses {registered}"
    )


def bounded_loss(reported: float, seen: float | None, tolerance: float) -> tuple[float, str | None]:
    """The loss a strategy may use, and why the reported one was replaced (or None).

    `seen` is the server-seen validation loss of the same model on the same source (the last
    evaluation, of the model the client received). A reported training-sample loss above
    `tolerance` times it is not believed and the seen loss is used instead: a source cannot buy
    weight with a larger number than its own validation split shows. A low report is kept: it
    only lowers the reporter's own weight, and a model fits its training clips better than its
    validation clips. Without a seen loss (no evaluation yet) the report is used as is.
    """
    if seen is None or not math.isfinite(seen) or reported <= tolerance * seen:
        return reported, None
    return seen, (
        f"loss-before {reported:.4g} is over {tolerance:g}x the server-seen validation loss "
        f"{seen:.4g} of the same model; using {seen:.4g}"
    )


# ---- update norms -----------------------------------------------------------------------------
def _non_finite(arrays: ArrayRecord) -> str:
    """Name the first floating array holding NaN or Inf (called once a norm came out NaN)."""
    for key, a in arrays.items():
        v = array_view(a)
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            return f"array {key!r} holds NaN or Inf"
    return "the update's norm overflows (values too large to square in their precision)"


def _blocks(v: np.ndarray) -> list[np.ndarray]:
    return [v[lo : lo + BLOCK] for lo in range(0, v.size, BLOCK)]


def update_norms(records: list[ArrayRecord], reference: ArrayRecord | None) -> list[float]:
    """L2 norm of (update - global) over floating arrays, per record (of the update itself
    without a global model); NaN where a NaN or Inf anywhere made the sum non-finite.

    The records must match the reference's keys, shapes and dtypes (`_reason` checks that
    first). Everything is read in place, block by block with the records inside: each block of
    the global model is read once for all replies, the differences go through one small buffer
    in the arrays' own precision, and the squared sums are added in float64.
    """
    totals = [0.0] * len(records)
    if reference is None:  # the norm of each update itself
        for i, rec in enumerate(records):
            for a in rec.values():
                v = array_view(a).reshape(-1)
                if v.dtype.kind == "f":
                    totals[i] += sum(float(np.dot(b, b)) for b in _blocks(v))
        return [math.sqrt(t) if math.isfinite(t) else math.nan for t in totals]
    for key, ref in reference.items():
        r = array_view(ref).reshape(-1)
        if r.dtype.kind != "f":
            continue
        views = [array_view(rec[key]).reshape(-1) for rec in records]
        buf = np.empty(min(r.size, BLOCK), dtype=r.dtype)
        for lo in range(0, r.size, BLOCK):
            ref_block = r[lo : lo + BLOCK]
            diff = buf[: ref_block.size]
            for i, v in enumerate(views):
                np.subtract(v[lo : lo + BLOCK], ref_block, out=diff)
                totals[i] += float(np.dot(diff, diff))
    return [math.sqrt(t) if math.isfinite(t) else math.nan for t in totals]


def norm_problems(
    norms: list[float], global_norm: float | None, history: list[float]
) -> list[str | None]:
    """Why each (finite) update norm is too large to accept, or None.

    Two references, each used where it exists, so one or two replies are judged too:
    - the global model: a norm over GLOBAL_NORM_FACTOR * ||global|| (when ||global|| > 0);
    - the median of `history` (recently accepted norms) and this round's norms, once there are
      NORM_MEDIAN_MIN of them: a norm over NORM_OUTLIER_FACTOR times it.
    """
    pool = list(history) + list(norms)
    median = float(np.median(pool)) if len(pool) >= NORM_MEDIAN_MIN else 0.0
    out: list[str | None] = []
    for n in norms:
        if global_norm and n > GLOBAL_NORM_FACTOR * global_norm:
            out.append(
                f"update norm {n:.3g} is over {GLOBAL_NORM_FACTOR:g}x the global model's "
                f"norm {global_norm:.3g}"
            )
        elif median > 0 and n > NORM_OUTLIER_FACTOR * median:
            out.append(
                f"update norm {n:.3g} is over {NORM_OUTLIER_FACTOR:g}x the median {median:.3g} "
                f"of this round's and recently accepted norms"
            )
        else:
            out.append(None)
    return out


@dataclass
class TrainCheck:
    """One round's train replies after validation."""

    valid: list[Message]
    norms: list[float]  # update norm of each valid reply
    rejected: list[dict[str, Any]]  # {"node", "reason"}


def validate_train_replies(
    replies: list[Message],
    reference: ArrayRecord | None,
    train_sources: set[int],
    node_source: dict[int, int],
    history: list[float] | None = None,
) -> TrainCheck:
    """Split one round's train replies into the valid ones (with their norms) and rejections."""
    rejected: list[dict[str, Any]] = []
    candidates = []
    for msg in replies:
        reason = _reason(msg, reference, train_sources, node_source)
        if reason is None:
            candidates.append(msg)
        else:
            rejected.append({"node": msg.metadata.src_node_id, "reason": reason})
    # one pass gives every norm and finds a NaN or Inf anywhere
    finite: list[tuple[Message, float]] = []
    for msg, norm in zip(
        candidates, update_norms([m.content[K.ARRAYS] for m in candidates], reference), strict=True
    ):
        if math.isfinite(norm):
            finite.append((msg, norm))
        else:
            reason = _non_finite(msg.content[K.ARRAYS])
            rejected.append({"node": msg.metadata.src_node_id, "reason": reason})
    global_norm = update_norms([reference], None)[0] if reference is not None else None
    why_not = norm_problems([n for _, n in finite], global_norm, history or [])
    check = TrainCheck([], [], rejected)
    for (msg, norm), why in zip(finite, why_not, strict=True):
        if why is None:
            check.valid.append(msg)
            check.norms.append(norm)
        else:
            rejected.append({"node": msg.metadata.src_node_id, "reason": why})
    return check
