"""The source-aware strategies on mock replies: weighting, lambda, and update validation."""

import numpy as np
import pytest

from server.strategy import DRO, DROSettings, SourceFedAvg
from server.strategy.dro_math import update_lambda
from tests.fedmock import arrays_record, train_reply

NAMES = {0: "a", 1: "b", 2: "c", 3: "held"}
GLOBAL = {"w": np.zeros((2, 2), np.float32), "steps": np.array(4, dtype=np.int64)}


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), value, np.float32), "steps": np.array(4, dtype=np.int64)}


def _strategy(cls=SourceFedAvg, **kw):
    s = cls(train_sources=[0, 1, 2], source_names=NAMES, **kw)
    for node, src in [(10, 0), (11, 1), (12, 2)]:
        s.register_node(node, src, heldout=False)
    s.current_arrays = arrays_record(GLOBAL)
    return s


def test_fedavg_weights_by_examples() -> None:
    s = _strategy()
    replies = [
        train_reply(10, _arrays(1.0), source=0, num_examples=10),
        train_reply(11, _arrays(2.0), source=1, num_examples=30),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 1.75))
    assert arrays["steps"].numpy().dtype == np.int64
    assert metrics["train-loss-mean"] == pytest.approx(1.0)


def test_dro_mixes_by_lambda_after_update() -> None:
    settings = DROSettings(eta=1.0, eps=0.1, cap=0.6)
    s = _strategy(DRO, settings=settings)
    losses = [0.5, 1.0, 2.0]
    replies = [
        train_reply(10 + i, _arrays(float(i)), source=i, loss_before=loss, num_examples=5 + i)
        for i, loss in enumerate(losses)
    ]
    arrays, _ = s.aggregate_train(1, replies)
    u = np.full(3, 1 / 3)
    lam = update_lambda("eg", u, np.array(losses), np.ones(3, bool), u, settings)
    np.testing.assert_allclose(s.lam, lam)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), lam @ [0.0, 1.0, 2.0]), rtol=1e-6)
    assert s.weights_by_source() == pytest.approx({0: lam[0], 1: lam[1], 2: lam[2]})
    # lambda survives a checkpoint round trip
    t = _strategy(DRO, settings=settings)
    t.load_state_dict(s.state_dict())
    np.testing.assert_allclose(t.lam, s.lam)


def test_dro_partial_participation_renormalises_over_repliers() -> None:
    s = _strategy(DRO, settings=DROSettings(eta=0.0, eps=0.0, cap=1.0))
    replies = [train_reply(10, _arrays(1.0), source=0), train_reply(12, _arrays(4.0), source=2)]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 2.5))


@pytest.mark.parametrize(
    ("arrays", "source", "reason"),
    [
        ({"w": np.full((2, 2), np.nan, np.float32), "steps": GLOBAL["steps"]}, 0, "NaN"),
        ({"w": np.zeros((3, 2), np.float32), "steps": GLOBAL["steps"]}, 0, "shape"),
        ({"w": np.zeros((2, 2), np.float64), "steps": GLOBAL["steps"]}, 0, "dtype"),
        ({"w": np.zeros((2, 2), np.float32)}, 0, "keys differ"),
        (_arrays(0.0), 3, "non-training source"),  # a held-out source must not train
        (_arrays(0.0), 1, "registered as source 0"),  # node 10 is source 0
    ],
)
def test_bad_updates_are_rejected_and_the_round_goes_on(arrays, source, reason) -> None:
    s = _strategy()
    bad = train_reply(10, arrays, source=source)
    good = train_reply(11, _arrays(3.0), source=1)
    out, _ = s.aggregate_train(2, [bad, good])
    np.testing.assert_allclose(out["w"].numpy(), np.full((2, 2), 3.0))
    assert len(s.rejected) == 1
    assert s.rejected[0]["node"] == 10 and s.rejected[0]["round"] == 2
    assert reason in s.rejected[0]["reason"]


def test_norm_outlier_rejected() -> None:
    s = _strategy()
    replies = [
        train_reply(10, _arrays(1.0), source=0),
        train_reply(11, _arrays(1.2), source=1),
        train_reply(12, _arrays(500.0), source=2),
    ]
    out, _ = s.aggregate_train(1, replies)
    assert [r["node"] for r in s.rejected] == [12]
    assert "norm" in s.rejected[0]["reason"]
    np.testing.assert_allclose(out["w"].numpy(), np.full((2, 2), 1.1), rtol=1e-6)


def test_too_few_valid_updates_keep_the_previous_model() -> None:
    s = _strategy(min_train_replies=2)
    out, metrics = s.aggregate_train(1, [train_reply(10, _arrays(1.0), source=0)])
    assert out is None and metrics is None
