"""Reject client updates that would corrupt the global model (docs/design.md §6).

A reply is rejected, with the node and the reason, when it carries an error, misses a record or a
metric key, names a source that does not train, has missing, extra or misshapen arrays, a wrong
dtype, a non-finite value, or an update norm far beyond the others'. The round goes on with
the rest.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from hdf import contract as K
from server.arrays import BLOCK, array_view

REQUIRED_TRAIN_METRICS = (K.NUM_EXAMPLES, K.SOURCE_INDEX, K.LOSS_BEFORE, K.TRAIN_LOSS)
NORM_OUTLIER_FACTOR = 10.0  # an update norm above this multiple of the median is rejected


def _reason(
    msg: Message,
    reference: ArrayRecord | None,
    train_sources: set[int],
    node_source: dict[int, int],
) -> str | None:
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if K.ARRAYS not in content.array_records:
        return f"no ArrayRecord {K.ARRAYS!r} in the reply"
    if K.METRICS not in content.metric_records:
        return f"no MetricRecord {K.METRICS!r} in the reply"
    metrics = content[K.METRICS]
    missing = [k for k in REQUIRED_TRAIN_METRICS if k not in metrics]
    if missing:
        return f"metrics miss {missing}"
    for k in REQUIRED_TRAIN_METRICS:
        v = metrics[k]
        if not isinstance(v, int | float) or not math.isfinite(float(v)):
            return f"metric {k!r} is not a finite number: {v!r}"
    if float(metrics[K.NUM_EXAMPLES]) <= 0:
        return f"num-examples is {metrics[K.NUM_EXAMPLES]}"
    src = int(metrics[K.SOURCE_INDEX])
    if src not in train_sources:
        return f"unknown or non-training source index {src}"
    node = msg.metadata.src_node_id
    if node in node_source and node_source[node] != src:
        return f"reports source {src} but registered as source {node_source[node]}"
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


def validate_train_replies(
    replies: list[Message],
    reference: ArrayRecord | None,
    train_sources: set[int],
    node_source: dict[int, int],
) -> tuple[list[Message], list[dict[str, Any]]]:
    """(valid replies, rejections as {"node", "reason"}) for one round of training replies."""
    valid: list[Message] = []
    norms: list[float] = []
    rejected: list[dict[str, Any]] = []
    candidates = []
    for msg in replies:
        reason = _reason(msg, reference, train_sources, node_source)
        if reason is None:
            candidates.append(msg)
        else:
            rejected.append({"node": msg.metadata.src_node_id, "reason": reason})
    # one pass gives every norm and finds a NaN or Inf anywhere
    for msg, norm in zip(
        candidates, update_norms([m.content[K.ARRAYS] for m in candidates], reference), strict=True
    ):
        if math.isfinite(norm):
            valid.append(msg)
            norms.append(norm)
        else:
            reason = _non_finite(msg.content[K.ARRAYS])
            rejected.append({"node": msg.metadata.src_node_id, "reason": reason})
    if len(valid) >= 3:
        median = float(np.median(norms))
        keep = []
        for m, n in zip(valid, norms, strict=True):
            if median > 0 and n > NORM_OUTLIER_FACTOR * median:
                rejected.append(
                    {
                        "node": m.metadata.src_node_id,
                        "reason": f"update norm {n:.3g} is over {NORM_OUTLIER_FACTOR:g}x "
                        f"the median {median:.3g}",
                    }
                )
            else:
                keep.append(m)
        valid = keep
    return valid, rejected
