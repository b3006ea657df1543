"""Held-out scores in metrics.jsonl rows: evaluation-only sites' replies, plain and adapted."""

import math

import pytest
from flwr.app import MetricRecord

from client.handlers import score_metrics
from hdf import contract as K
from server.federation import eval_rows
from server.validation import evaluate_metrics

NAMES = {0: "a", 1: "b", 3: "held"}


def _stats(uar: float, loss: float) -> dict:
    recall = [uar] * 6 + [math.nan]  # class 6 absent from the split
    return {"loss": loss, "uar": uar, "war": uar, "recall": recall}


def _checked(metrics: dict) -> dict[str, float]:
    """An accepted evaluate reply's numbers as the strategy keeps them."""
    return evaluate_metrics(MetricRecord({K.NUM_EXAMPLES: 10, **metrics}))[0]


def test_eval_rows_reads_the_configured_adapted_scores_of_heldout_sites() -> None:
    """Source 3 is held out and replied plain (uar .2), bn (.5) and tent (.6) scores, the keys the
    client writes; with methods [bn] only bn is read, a training source's row has no adapted
    part, and the absent class is None."""
    held = {K.SOURCE_INDEX: 3, **score_metrics(_stats(0.2, 2.0))}
    held.update(score_metrics(_stats(0.5, 1.5), K.adapted_key("bn", "")))
    held.update(score_metrics(_stats(0.6, 1.4), K.adapted_key("tent", "")))
    train_row = {K.SOURCE_INDEX: 0, **score_metrics(_stats(0.4, 1.0))}
    by_source = {0: _checked(train_row), 3: _checked(held)}
    train, plain, adapted = eval_rows(by_source, {0, 1}, NAMES, ["bn"])
    assert set(train) == {"a"} and set(plain) == {"held"}
    assert plain["held"]["uar"] == pytest.approx(0.2) and plain["held"]["loss"] == 2.0
    assert plain["held"]["recall"] == [pytest.approx(0.2)] * 6 + [None]
    assert adapted == {
        "bn": {
            "held": {"loss": 1.5, "uar": 0.5, "war": 0.5, "recall": [0.5] * 6 + [None]},
        }
    }
    _, _, both = eval_rows(by_source, {0, 1}, NAMES, ["bn", "tent"])
    assert both["tent"]["held"]["uar"] == pytest.approx(0.6)
    assert eval_rows(by_source, {0, 1}, NAMES, [])[2] == {}


def test_a_bad_or_partial_adapted_set_drops_itself_not_the_reply() -> None:
    """Validation keeps a method's adapted scores only whole and in range: bn's uar 1.7 and a
    tent set missing its last recall are left out with their reasons; the plain scores and
    the good set stay (eval_rows then finds no bn or tent row)."""
    held = {K.SOURCE_INDEX: 3, **score_metrics(_stats(0.2, 2.0))}
    held.update(score_metrics(_stats(0.5, 1.5), K.adapted_key("bn", "")))
    held.update(score_metrics(_stats(0.6, 1.4), K.adapted_key("tent", "")))
    held.update(score_metrics(_stats(0.7, 1.3), K.adapted_key("other", "")))
    held[K.adapted_key("bn", K.UAR)] = 1.7
    del held[K.adapted_key("tent", f"{K.RECALL_PREFIX}6")]
    kept, dropped = evaluate_metrics(MetricRecord({K.NUM_EXAMPLES: 10, **held}))
    assert dropped == {
        "bn": "metric 'adapted-bn-uar' = 1.7 is outside [0, 1]",
        "tent": "metrics miss ['adapted-tent-recall-6']",
    }
    assert kept[K.UAR] == pytest.approx(0.2) and kept[K.adapted_key("other", K.UAR)] == 0.7
    assert not any(k.startswith(("adapted-bn-", "adapted-tent-")) for k in kept)
    _, plain, adapted = eval_rows({3: kept}, {0, 1}, NAMES, ["bn", "tent", "other"])
    assert set(plain) == {"held"} and set(adapted) == {"other"}


def test_the_strategy_keeps_a_heldout_sites_adapted_scores() -> None:
    """A held-out node's evaluate reply with bn-adapted scores: the evaluation's per-source
    numbers carry them to the round loop (sites score held-out sources when
    server.heldout_eval=clients)."""
    from flwr.app import Message, MessageType, RecordDict

    from server.strategy import SourceFedAvg
    from tests.fedmock import instruction

    s = SourceFedAvg(train_sources=[0, 1], source_names=NAMES)
    s.register_node(13, 3, heldout=True, clips=5)
    metrics = {K.NUM_EXAMPLES: 5, K.SOURCE_INDEX: 3, **score_metrics(_stats(0.2, 2.0))}
    metrics.update(score_metrics(_stats(0.5, 1.5), K.adapted_key("bn", "")))
    reply = Message(
        content=RecordDict({K.METRICS: MetricRecord(metrics)}),
        reply_to=instruction(13, kind=MessageType.EVALUATE),
    )
    out = s.evaluate_round(1, [reply])
    assert out.rejected == ()
    assert out.by_source[3][K.adapted_key("bn", K.UAR)] == 0.5
    _, _, adapted = eval_rows(out.by_source, {0, 1}, NAMES, ["bn"])
    assert adapted["bn"]["held"]["loss"] == 1.5
