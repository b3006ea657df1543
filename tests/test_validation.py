"""The server's checks of client replies as plain functions (server/validation.py, issue 12)."""

import math

import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from hdf import contract as K
from server.validation import (
    EVAL_REQUIRED,
    TRAIN_OPTIONAL,
    TRAIN_REQUIRED,
    bounded_loss,
    check_metrics,
    evaluate_reply_problem,
    norm_problems,
    query_reply,
    size_flag,
)
from tests.fedmock import eval_reply, instruction

TRAIN = {K.NUM_EXAMPLES: 10, K.SOURCE_INDEX: 1, K.LOSS_BEFORE: 1.9, K.TRAIN_LOSS: -0.3}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({K.LOSS_BEFORE: math.nan}, "metric 'loss-before' is not finite: nan"),
        ({K.LOSS_BEFORE: math.inf}, "metric 'loss-before' is not finite: inf"),
        ({K.LOSS_BEFORE: -0.1}, "metric 'loss-before' = -0.1 is outside [0, 10000]"),
        ({K.LOSS_BEFORE: 2e4}, "metric 'loss-before' = 20000.0 is outside [0, 10000]"),
        ({K.LOSS_BEFORE_BALANCED: math.nan}, "metric 'loss-before-balanced' is not finite"),
        ({K.LOCAL_VAL_LOSS: -1.0}, "metric 'local-val-loss' = -1.0 is outside"),
        ({K.TRAIN_UAR: 1.5}, "metric 'train-uar' = 1.5 is outside [0, 1]"),
        ({K.NUM_EXAMPLES: 0}, "metric 'num-examples' = 0 is outside [1, inf]"),
        ({K.NUM_EXAMPLES: 2.5}, "metric 'num-examples' = 2.5 is not a whole number"),
        ({K.SOURCE_INDEX: -1}, "metric 'source-index' = -1 is outside"),
        ({K.SOURCE_INDEX: [1, 2]}, "metric 'source-index' is not a number: [1, 2]"),
        ({K.TRAIN_LOSS: -20000.0}, "metric 'train-loss' = -20000.0 is outside [-10000, 10000]"),
    ],
)
def test_train_metrics_are_checked_finite_and_in_range(change, reason) -> None:
    """Every metric a strategy consumes: the required ones and the optional ones when sent.
    The train loss may be negative (HDF's weighted contrastive term), a loss-before may not."""
    metrics = MetricRecord({**TRAIN, **change})
    why = check_metrics(metrics, TRAIN_REQUIRED, TRAIN_OPTIONAL)
    assert why == reason if reason is None else reason in why


def test_a_missing_required_metric_is_named() -> None:
    metrics = MetricRecord({k: v for k, v in TRAIN.items() if k != K.LOSS_BEFORE})
    assert check_metrics(metrics, TRAIN_REQUIRED) == "metrics miss ['loss-before']"


def test_recall_accepts_the_absent_marker_only() -> None:
    metrics = eval_reply(10, source=1, loss=1.0).content[K.METRICS]
    metrics[f"{K.RECALL_PREFIX}3"] = -1.0  # class 3 absent from the split
    assert check_metrics(metrics, EVAL_REQUIRED) is None
    metrics[f"{K.RECALL_PREFIX}3"] = -0.5
    assert "metric 'recall-3' = -0.5 is outside [0, 1]" in check_metrics(metrics, EVAL_REQUIRED)


def test_norm_bound_works_with_one_or_two_replies() -> None:
    """||global|| = 5: bound 10 * 5 = 50; with fewer than 3 norms in all there is no median."""
    assert norm_problems([1.0, 50.0], 5.0, []) == [None, None]
    why = norm_problems([1.0, 60.0], 5.0, [])
    assert why[0] is None and "update norm 60 is over 10x the global model's norm 5" in why[1]
    assert norm_problems([60.0], 5.0, [])[0] is not None  # one reply alone is judged too
    assert norm_problems([1.0, 1000.0], None, []) == [None, None]  # nothing to judge against
    assert norm_problems([1.0, 1000.0], 0.0, []) == [None, None]  # an all-zero global model


def test_norm_median_includes_recently_accepted_norms() -> None:
    """History (2, 4) and this round (3, 50): median of (2, 4, 3, 50) = 3.5, bound 35:
    50 is rejected, 3 is not. Exactly 10x the median is still accepted."""
    why = norm_problems([3.0, 50.0], None, [2.0, 4.0])
    assert why[0] is None
    assert "update norm 50 is over 10x the median 3.5" in why[1]
    assert norm_problems([35.0], None, [2.0, 4.0, 3.0]) == [None]  # median of (2, 3, 4, 35)


def test_a_loss_far_above_the_seen_validation_loss_is_replaced_by_it() -> None:
    """tolerance 2, seen 2.0: 5.0 > 4.0 is replaced by 2.0 and flagged; 4.0 and a low 0.1 are
    kept; without a seen loss the report stands."""
    value, why = bounded_loss(5.0, 2.0, 2.0)
    assert value == 2.0 and "loss-before 5 is over 2x the server-seen validation loss 2" in why
    assert bounded_loss(4.0, 2.0, 2.0) == (4.0, None)
    assert bounded_loss(0.1, 2.0, 2.0) == (0.1, None)
    assert bounded_loss(500.0, None, 2.0) == (500.0, None)
    assert bounded_loss(500.0, math.nan, 2.0) == (500.0, None)


def test_size_flag_names_the_registered_size() -> None:
    assert size_flag(24.0, 24) is None
    assert size_flag(1e12, 24) == (
        "num-examples 1e+12 differs from the 24 clips registered at discovery; weighting uses 24"
    )


def _query_reply(metrics: dict | None) -> Message:
    content = RecordDict({} if metrics is None else {K.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=instruction(7, kind=MessageType.QUERY))


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        (
            {K.SOURCE_INDEX: 2, K.NUM_EXAMPLES: 30, K.HELDOUT: 0, K.NUM_PARTITIONS: 3},
            {"source": 2, "heldout": 0, "clips": 30, "partitions": 3},
        ),
        ({K.SOURCE_INDEX: 3, K.NUM_EXAMPLES: 30, K.HELDOUT: 1}, {"source": 3, "heldout": 1}),
        (None, "no MetricRecord 'metrics' in the reply"),
        ({K.SOURCE_INDEX: 2, K.HELDOUT: 0}, "metrics miss ['num-examples']"),
        ({K.SOURCE_INDEX: 4, K.NUM_EXAMPLES: 30, K.HELDOUT: 0}, "source index 4 is not a source"),
        ({K.SOURCE_INDEX: 2, K.NUM_EXAMPLES: 30, K.HELDOUT: 1}, "says source 2 is held out"),
        ({K.SOURCE_INDEX: 3, K.NUM_EXAMPLES: 30, K.HELDOUT: 0}, "says source 3 is not held out"),
        ({K.SOURCE_INDEX: 2, K.NUM_EXAMPLES: math.nan, K.HELDOUT: 0}, "not finite"),
    ],
)
def test_query_replies_are_checked_against_the_runs_sources(metrics, expected) -> None:
    """A run of 4 sources, source 3 held out."""
    out = query_reply(_query_reply(metrics), heldout_sources={3}, num_sources=4)
    if isinstance(expected, dict):
        assert isinstance(out, dict) and expected.items() <= out.items()
    else:
        assert isinstance(out, str) and expected in out


def test_evaluate_replies_must_come_from_the_registered_source() -> None:
    registered = {10: 0, 11: 1}
    assert evaluate_reply_problem(eval_reply(10, source=0, loss=1.0), registered) is None
    forged = eval_reply(10, source=1, loss=1.0)
    assert evaluate_reply_problem(forged, registered) == (
        "reports source 1 but registered as source 0"
    )
    stranger = eval_reply(12, source=1, loss=1.0)
    assert "never registered a source" in evaluate_reply_problem(stranger, registered)
    nan = eval_reply(11, source=1, loss=math.nan)
    assert evaluate_reply_problem(nan, registered) == "metric 'loss' is not finite: nan"
    bad_uar = eval_reply(11, source=1, loss=1.0, uar=2.0)
    assert "metric 'uar' = 2.0 is outside [0, 1]" in evaluate_reply_problem(bad_uar, registered)
    empty = Message(content=RecordDict({}), reply_to=instruction(11, kind=MessageType.EVALUATE))
    assert evaluate_reply_problem(empty, registered) == "no MetricRecord 'metrics' in the reply"
