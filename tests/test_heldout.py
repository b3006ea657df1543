"""Held-out scores in metrics.jsonl rows: evaluation-only sites' replies, plain and adapted."""

import math

import pytest

from client.handlers import score_metrics
from hdf import contract as K
from server.federation import eval_rows

NAMES = {0: "a", 1: "b", 3: "held"}


def _stats(uar: float, loss: float) -> dict:
    recall = [uar] * 6 + [math.nan]  # class 6 absent from the split
    return {"loss": loss, "uar": uar, "war": uar, "recall": recall}


def test_eval_rows_reads_the_configured_adapted_scores_of_heldout_sites() -> None:
    """Source 3 is held out and replied plain (uar .2), bn (.5) and tent (.6) scores, the keys the
    client writes; with methods [bn] only bn is read, a training source's row has no adapted
    part, the absent class is None, and an out-of-range adapted reply is dropped."""
    held = {K.SOURCE_INDEX: 3, **score_metrics(_stats(0.2, 2.0))}
    held.update(score_metrics(_stats(0.5, 1.5), K.adapted_key("bn", "")))
    held.update(score_metrics(_stats(0.6, 1.4), K.adapted_key("tent", "")))
    train_row = {K.SOURCE_INDEX: 0, **score_metrics(_stats(0.4, 1.0))}
    by_source = {0: train_row, 3: held}
    train, plain, adapted = eval_rows(by_source, {0, 1}, NAMES, ["bn"])
    assert set(train) == {"a"} and set(plain) == {"held"}
    assert plain["held"]["uar"] == pytest.approx(0.2) and plain["held"]["loss"] == 2.0
    assert adapted == {
        "bn": {
            "held": {"loss": 1.5, "uar": 0.5, "war": 0.5, "recall": [0.5] * 6 + [None]},
        }
    }
    _, _, both = eval_rows(by_source, {0, 1}, NAMES, ["bn", "tent"])
    assert both["tent"]["held"]["uar"] == pytest.approx(0.6)
    assert eval_rows(by_source, {0, 1}, NAMES, [])[2] == {}
    held[K.adapted_key("bn", K.UAR)] = 1.7
    assert eval_rows(by_source, {0, 1}, NAMES, ["bn"])[2] == {}
