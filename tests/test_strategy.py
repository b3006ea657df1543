"""The source-aware strategies on mock replies: weighting, lambda, and update validation."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from client.wire import received
from hdf import contract as K
from hdf.config import CONF_DIR as CONF
from hdf.config import compose
from hdf.torchfile import load_torch_file
from server.strategy import (
    DRO,
    DROSettings,
    FedDGGA,
    LocalOnly,
    QFedAvg,
    SourceFedAvg,
    build_strategy,
    list_strategies,
)
from server.strategy.dro_math import DRO_MODES, DROMode, register_mode, update_lambda
from tests.fedmock import (
    FakeGrid,
    arrays_record,
    eval_reply,
    instruction,
    three_source_strategy,
    train_reply,
)

NAMES = {0: "a", 1: "b", 2: "c", 3: "held"}
GLOBAL = {"w": np.zeros((2, 2), np.float32), "steps": np.array(4, dtype=np.int64)}


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), value, np.float32), "steps": np.array(4, dtype=np.int64)}


def _strategy(cls=SourceFedAvg, sizes=(10, 10, 10), **kw):
    """Nodes 10, 11, 12 serve sources 0, 1, 2 with `sizes` clips registered at discovery."""
    s = cls(train_sources=[0, 1, 2], source_names=NAMES, **kw)
    for node, src in [(10, 0), (11, 1), (12, 2)]:
        s.register_node(node, src, heldout=False, clips=sizes[src])
    s.current_arrays = arrays_record(GLOBAL)
    return s


def test_fedavg_weights_by_registered_sizes() -> None:
    """Sizes 10 and 30 registered at discovery: (1 * 10 + 2 * 30) / 40 = 1.75. A reply claiming
    1e12 clips in the round is flagged and still weighs its registered 10 (issue 12 item 6)."""
    s = _strategy(sizes=(10, 30, 10))
    replies = [
        train_reply(10, _arrays(1.0), source=0, num_examples=10),
        train_reply(11, _arrays(2.0), source=1, num_examples=30),
    ]
    first = s.train_round(1, replies)
    np.testing.assert_allclose(first.arrays["w"].numpy(), np.full((2, 2), 1.75))
    assert first.arrays["steps"].numpy().dtype == np.int64
    assert first.summary["train-loss-mean"] == pytest.approx(1.0)
    assert set(first.by_source) == {0, 1} and first.flagged == first.rejected == ()
    # the updates' norms: ||1 - 0|| and ||2 - 0|| over the 4 floats of w
    assert first.update_norm == pytest.approx({0: 2.0, 1: 4.0})
    replies[0].content[K.METRICS][K.NUM_EXAMPLES] = 10**12
    second = s.train_round(2, replies)
    np.testing.assert_allclose(second.arrays["w"].numpy(), np.full((2, 2), 1.75))
    assert s.weights_by_source() == pytest.approx({0: 0.25, 1: 0.75, 2: 0.0})
    assert [(f.round, f.node, f.source) for f in second.flagged] == [(2, 10, 0)]
    assert "num-examples 1e+12 differs from the 10 clips registered" in second.flagged[0].reason


@pytest.mark.parametrize("cls", [SourceFedAvg, DRO])
def test_the_mix_does_not_depend_on_reply_order(cls) -> None:
    """float32 sums are not associative: (1e8 + 1) - 1e8 = 0 but (1e8 - 1e8) + 1 = 1. Replies
    arriving in any order give the same bits (the mix runs in source order)."""
    values = {0: 3e8, 1: 3.0, 2: -3e8}
    replies = [train_reply(10 + s, _arrays(v), source=s) for s, v in values.items()]
    outs = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        s = _strategy(cls)
        arrays, _ = s.aggregate_train(1, [replies[i] for i in order])
        outs.append(arrays["w"].numpy())
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_dro_mixes_by_lambda_after_update() -> None:
    settings = DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=0.6)
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
    np.testing.assert_allclose(
        arrays["w"].numpy(), np.full((2, 2), lam @ [0.0, 1.0, 2.0]), rtol=1e-6
    )
    assert s.weights_by_source() == pytest.approx({0: lam[0], 1: lam[1], 2: lam[2]})
    # lambda survives a checkpoint round trip
    t = _strategy(DRO, settings=settings)
    t.load_state_dict(s.state_dict())
    np.testing.assert_allclose(t.lam, s.lam)


def test_dro_balanced_loss_moves_lambda_on_the_class_balanced_loss() -> None:
    """loss=balanced reads `loss-before-balanced` (1, 2, 1), not the plain (2, .5, .5): lambda
    is eg's update on (1, 2, 1); a reply without the balanced loss falls back to its plain one."""
    settings = DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=0.6)
    u = np.full(3, 1 / 3)
    ones = np.ones(3, bool)
    s = _strategy(DRO, settings=settings, loss="balanced")
    replies = []
    for i, (plain, balanced) in enumerate([(2.0, 1.0), (0.5, 2.0), (0.5, 1.0)]):
        replies.append(train_reply(10 + i, _arrays(float(i)), source=i, loss_before=plain))
        replies[-1].content[K.METRICS][K.LOSS_BEFORE_BALANCED] = balanced
    s.aggregate_train(1, replies)
    np.testing.assert_allclose(
        s.lam, update_lambda("eg", u, np.array([1.0, 2.0, 1.0]), ones, u, settings)
    )
    t = _strategy(DRO, settings=settings, loss="balanced")
    t.aggregate_train(
        1,
        [
            train_reply(10 + i, _arrays(0.0), source=i, loss_before=v)
            for i, v in enumerate([2.0, 0.5, 0.5])
        ],
    )
    np.testing.assert_allclose(
        t.lam, update_lambda("eg", u, np.array([2.0, 0.5, 0.5]), ones, u, settings)
    )
    with pytest.raises(ValueError, match="unknown DRO loss 'ce'"):
        _strategy(DRO, loss="ce")


def test_dro_partial_participation_renormalises_over_repliers() -> None:
    s = _strategy(DRO, settings=DROSettings(max_step=1.0, eta=0.0, eps=0.0, cap=1.0))
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
    out = s.train_round(2, [bad, good])
    np.testing.assert_allclose(out.arrays["w"].numpy(), np.full((2, 2), 3.0))
    assert [(r.round, r.kind, r.node) for r in out.rejected] == [(2, "train", 10)]
    assert reason in out.rejected[0].reason
    assert set(out.by_source) == {1}


def test_norm_outlier_rejected() -> None:
    s = _strategy()
    replies = [
        train_reply(10, _arrays(1.0), source=0),
        train_reply(11, _arrays(1.2), source=1),
        train_reply(12, _arrays(500.0), source=2),
    ]
    out = s.train_round(1, replies)
    assert [r.node for r in out.rejected] == [12]
    assert "norm" in out.rejected[0].reason
    np.testing.assert_allclose(out.arrays["w"].numpy(), np.full((2, 2), 1.1), rtol=1e-6)


def test_a_x1000_update_is_rejected_with_two_replies() -> None:
    """Global w = 1 (norm 2 over 4 elements): bound 10 * 2 = 20. The honest update w = 1.1 has
    norm .2; w = 1000 has 2 * 999 = 1998 and is rejected, so the mix is the honest 1.1. The
    accepted norm is remembered across a checkpoint for the next rounds' median."""
    s = _strategy()
    s.current_arrays = arrays_record(_arrays(1.0))
    out = s.train_round(
        1,
        [train_reply(10, _arrays(1.1), source=0), train_reply(11, _arrays(1000.0), source=1)],
    )
    np.testing.assert_allclose(out.arrays["w"].numpy(), np.full((2, 2), 1.1), rtol=1e-6)
    assert [(r.node, r.kind) for r in out.rejected] == [(11, "train")]
    assert "update norm 2e+03 is over 10x the global model's norm 2" in out.rejected[0].reason
    assert s.norm_history == pytest.approx([0.2], rel=1e-5)
    t = _strategy()
    t.load_state_dict(s.state_dict())
    assert t.norm_history == s.norm_history


def test_a_dro_liar_is_flagged_and_counts_with_the_seen_validation_loss() -> None:
    """Validation losses of the model sent: (1, 2, 3). Source 2 reports 300: over 2x its 3, so
    lambda moves on (1, 2, 3): the eg round of test_dro_math, (.155403, .344597, .5). Without
    the check it would move on the clipped 10."""
    settings = DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=0.5)
    s = _strategy(DRO, settings=settings)
    s.aggregate_evaluate(0, [eval_reply(10 + i, source=i, loss=1.0 + i) for i in range(3)])
    out = _round(s, 1, [1.0, 2.0, 300.0])
    np.testing.assert_allclose(s.lam, [0.155403, 0.344597, 0.5], atol=2e-6)
    assert [(f.node, f.source) for f in out.flagged] == [(12, 2)]
    assert "loss-before 300 is over 2x the server-seen validation loss 3" in out.flagged[0].reason
    np.testing.assert_allclose(s.loss_memory, [1.0, 2.0, 3.0])


def test_balanced_dro_checks_against_the_balanced_validation_loss() -> None:
    """loss=balanced compares loss-before-balanced with the evaluate reply's loss-balanced
    (here 1.5 for every source): a balanced 4 is replaced by 1.5, a NaN one is rejected."""
    settings = DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=0.6)
    s = _strategy(DRO, settings=settings, loss="balanced")
    evals = [eval_reply(10 + i, source=i, loss=1.0) for i in range(3)]
    for m in evals:
        m.content[K.METRICS][K.LOSS_BALANCED] = 1.5
    s.aggregate_evaluate(0, evals)
    replies = [train_reply(10 + i, _arrays(float(i)), source=i) for i in range(3)]
    for m, balanced in zip(replies, [1.0, 4.0, float("nan")], strict=True):
        m.content[K.METRICS][K.LOSS_BEFORE_BALANCED] = balanced
    out = s.train_round(1, replies)
    assert [r.node for r in out.rejected] == [12]
    assert "'loss-before-balanced' is not finite" in out.rejected[0].reason
    u = np.full(3, 1 / 3)
    expected = update_lambda(
        "eg", u, np.array([1.0, 1.5, 0.0]), np.array([1, 1, 0], bool), u, settings
    )
    np.testing.assert_allclose(s.lam, expected)
    assert np.isfinite(s.lam).all()


def test_evaluate_replies_are_validated_and_never_overwrite_another_source() -> None:
    s = _strategy()
    empty = instruction(12, kind=MessageType.EVALUATE)
    replies = [
        eval_reply(10, source=0, loss=0.5),
        eval_reply(11, source=0, loss=9.0),  # node 11 serves source 1
        Message(content=RecordDict({}), reply_to=empty),
    ]
    out = s.evaluate_round(3, replies)
    assert out.by_source[0][K.LOSS] == 0.5 and set(out.by_source) == {0}
    # in (source, node) order, not arrival order: the empty reply has no source to read
    assert [(r.round, r.kind, r.node, r.source) for r in out.rejected] == [
        (3, "evaluate", 12, 2),
        (3, "evaluate", 11, 1),
    ]
    assert out.rejected[1].reason == "reports source 0 but registered as source 1"
    assert s.val_loss == {0: 0.5}
    assert out.weights == s.weights_by_source()


def test_a_non_finite_lambda_is_refused_and_the_previous_kept(monkeypatch) -> None:
    """The invariant holds even if the maths misbehave: a NaN lambda is never taken."""
    import server.strategy.dro as dro

    s = _strategy(DRO)
    before = s.lam.copy()
    monkeypatch.setattr(dro, "update_lambda", lambda *a, **k: np.full(3, np.nan))
    out = _round(s, 1, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(s.lam, before)
    assert "lambda update gave [nan, nan, nan]" in out.flagged[0].reason
    np.testing.assert_allclose(out.arrays["w"].numpy(), np.full((2, 2), 1.0), rtol=1e-6)


def test_a_non_finite_aggregate_keeps_the_previous_model(monkeypatch) -> None:
    s = _strategy()
    monkeypatch.setattr(s, "aggregate_updates", lambda r, replies: arrays_record(_arrays(np.inf)))
    out = s.train_round(1, [train_reply(10, _arrays(1.0), source=0)])
    assert out.arrays is None and out.summary is None
    assert [f.reason for f in out.flagged] == [
        "the aggregated model holds NaN or Inf: kept the previous model"
    ]


class _QueryGrid(FakeGrid):
    """Answers query messages with prepared replies."""

    def __init__(self, replies: dict[int, RecordDict]) -> None:
        super().__init__(list(replies))
        self.replies = replies

    def send_and_receive(self, messages, timeout=None):
        return [Message(content=self.replies[m.metadata.dst_node_id], reply_to=m) for m in messages]


def test_query_replies_without_records_or_with_lies_are_refused() -> None:
    from flwr.app import MetricRecord

    from server.federation import query_nodes

    good = {K.SOURCE_INDEX: 1, K.NUM_EXAMPLES: 20, K.HELDOUT: 0, K.NUM_PARTITIONS: 0}
    grid = _QueryGrid(
        {
            1: RecordDict({K.METRICS: MetricRecord(good)}),
            2: RecordDict({}),
            3: RecordDict({K.METRICS: MetricRecord({**good, K.SOURCE_INDEX: 9})}),
        }
    )
    found, refused = query_nodes(grid, "", [1, 2, 3], heldout={3}, num_sources=4)
    assert found == {1: {"source": 1, "heldout": 0, "clips": 20, "partitions": 0}}
    assert refused == {
        2: "no MetricRecord 'metrics' in the reply",
        3: "source index 9 is not a source of this run (it has 4)",
    }


def test_too_few_valid_updates_keep_the_previous_model() -> None:
    s = _strategy(min_train_replies=2)
    out, metrics = s.aggregate_train(1, [train_reply(10, _arrays(1.0), source=0)])
    assert out is None and metrics is None


# ---- the DRO modes inside the strategy -------------------------------------------------------
def _round(s, server_round, losses, values=None, nodes=(10, 11, 12)):
    """One training round from the nodes given (node 10 + i serves source i)."""
    replies = [
        train_reply(
            n,
            _arrays(float(values[n - 10] if values else n - 10)),
            source=n - 10,
            loss_before=losses[n - 10],
        )
        for n in nodes
    ]
    return s.train_round(server_round, replies)


def test_dro_kl_remembers_silent_sources_across_rounds_and_checkpoints() -> None:
    """The test_dro_math KL example through the strategy: round 1 all three report (1, 2, 3);
    round 2 only sources 0 and 1 report (3, 1) and source 2's remembered 3 is used:
    lambda = (.454813, .090374, .454813). The memory survives a checkpoint."""
    settings = DROSettings(max_step=1.0, eps=0.1, cap=0.5, tau=1.0)
    s = _strategy(DRO, mode="kl", settings=settings)
    _round(s, 1, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(s.lam, [0.155403, 0.344597, 0.5], atol=2e-6)
    t = _strategy(DRO, mode="kl", settings=settings)
    t.load_state_dict(s.state_dict())
    np.testing.assert_allclose(t.loss_memory, [1.0, 2.0, 3.0])
    arrays = _round(t, 2, [3.0, 1.0, 0.0], nodes=(10, 11)).arrays
    np.testing.assert_allclose(t.lam, [0.454813, 0.090374, 0.454813], atol=2e-6)
    # partial participation: only the repliers are mixed, renormalised over their lambda
    w = t.lam[:2] / t.lam[:2].sum()
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), w @ [0.0, 1.0]), rtol=1e-6)


def test_dro_partial_participation_every_mode_keeps_lambda_on_the_capped_simplex() -> None:
    for mode in ["eg", "kl", "cvar", "afl"]:
        s = _strategy(DRO, mode=mode, settings=DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=0.5))
        for r in range(1, 6):
            nodes = [(10, 11), (12,), (10, 12), (11,), (10, 11, 12)][r - 1]
            _round(s, r, [1.0, 2.0, 5.0], nodes=nodes)
            assert s.lam.sum() == pytest.approx(1.0) and s.lam.max() <= 0.5 + 1e-12, mode


def test_regret_strategy_moves_lambda_on_excess_validation_loss() -> None:
    """The test_dro_math regret example through the strategy. The evaluation that ends round 0
    gives the global model's validation losses (1, 2, 1.5); round 1's replies report the local
    models' (0.5, 1.9, 1.5) and loss-before 9 (not used): lambda = (.428616, .298299, .273084)
    and the update is mixed by it. Round 2: validation (0.8, 2.0, 1.2), local (0.8, 1.0, 1.4):
    (.297783, .5, .202217); a checkpoint in between changes nothing."""
    settings = DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=0.5)
    s = _strategy(DRO, mode="regret", settings=settings)
    assert s.estimate == "val"
    sent = list(s.configure_train(1, arrays_record(GLOBAL), ConfigRecord({}), FakeGrid([10])))
    assert sent[0].content[K.CONFIG][K.LOCAL_VAL] == 1

    def round_(strategy, r, val, local):
        strategy.aggregate_evaluate(
            r - 1, [eval_reply(10 + i, source=i, loss=v) for i, v in enumerate(val)]
        )
        replies = [
            train_reply(10 + i, _arrays(float(i)), source=i, loss_before=9.0) for i in range(3)
        ]
        for m, v in zip(replies, local, strict=True):
            m.content[K.METRICS][K.LOCAL_VAL_LOSS] = v
        return strategy.aggregate_train(r, replies)[0]

    arrays = round_(s, 1, [1.0, 2.0, 1.5], [0.5, 1.9, 1.5])
    np.testing.assert_allclose(s.lam, [0.428616, 0.298299, 0.273084], atol=2e-6)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), s.lam @ [0, 1, 2]), rtol=1e-6)
    t = _strategy(DRO, mode="regret", settings=settings)
    t.load_state_dict(s.state_dict())
    round_(t, 2, [0.8, 2.0, 1.2], [0.8, 1.0, 1.4])
    np.testing.assert_allclose(t.lam, [0.297783, 0.5, 0.202217], atol=2e-6)


def test_regret_source_without_local_loss_keeps_its_weight() -> None:
    """Source 1 sends no local-val-loss: it keeps 1/3; sources 0 and 2 (excess 1 and 0) share
    the other 2/3 in the EG proportions e : 1 (eps 0, no cap)."""
    s = _strategy(DRO, mode="regret", settings=DROSettings(max_step=1.0, eta=1.0, eps=0.0, cap=1.0))
    s.aggregate_evaluate(0, [eval_reply(10 + i, source=i, loss=2.0) for i in range(3)])
    replies = [train_reply(10 + i, _arrays(0.0), source=i) for i in range(3)]
    for i, v in [(0, 1.0), (2, 2.5)]:
        replies[i].content[K.METRICS][K.LOCAL_VAL_LOSS] = v
    s.aggregate_train(1, replies)
    e = np.e / (np.e + 1)
    np.testing.assert_allclose(s.lam, [2 / 3 * e, 1 / 3, 2 / 3 * (1 - e)], atol=1e-12)


def test_regret_needs_the_validation_estimate() -> None:
    with pytest.raises(ValueError, match=r"strategy\.dro\.estimate=val"):
        _strategy(DRO, mode="regret", estimate="sample")
    with pytest.raises(ValueError, match=r"unknown strategy\.dro\.estimate 'test'"):
        _strategy(DRO, estimate="test")
    with pytest.raises(ValueError, match=r"smoothing=1\.0"):
        _strategy(DRO, smoothing=1.0)


def test_val_estimate_with_smoothing_by_hand() -> None:
    """eg, estimate=val, smoothing 0.5: the loss-before (9) is not used. Round 1: validation
    losses (1, 2, 3) (first values, taken as they are): the test_dro_math eg round 1,
    (.155403, .344597, .5). Round 2: validation (3, 1, 1), smoothed to (2, 1.5, 2): lam *
    exp(2, 1.5, 2) normalised = (.179779, .241793, .578428); mixed (.195135, .250947, .553919);
    the third is capped and the others share .5: (.218721, .281279, .5)."""
    settings = DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=0.5)
    s = _strategy(DRO, settings=settings, estimate="val", smoothing=0.5)
    for r, val in [(1, [1.0, 2.0, 3.0]), (2, [3.0, 1.0, 1.0])]:
        s.aggregate_evaluate(
            r - 1, [eval_reply(10 + i, source=i, loss=v) for i, v in enumerate(val)]
        )
        _round(s, r, [9.0, 9.0, 9.0])
        if r == 1:
            np.testing.assert_allclose(s.lam, [0.155403, 0.344597, 0.5], atol=2e-6)
    np.testing.assert_allclose(s.loss_memory, [2.0, 1.5, 2.0])
    np.testing.assert_allclose(s.lam, [0.218721, 0.281279, 0.5], atol=2e-6)


def test_val_estimate_uses_only_the_last_evaluation() -> None:
    """Source 2 missed the last evaluation: under estimate=val it has no current validation
    loss and falls back to its loss-before (here equal to source 0's validation loss, so the
    two end equal), not to the stale value 5 of the evaluation before."""
    s = _strategy(
        DRO, settings=DROSettings(max_step=1.0, eta=1.0, eps=0.0, cap=1.0), estimate="val"
    )
    s.aggregate_evaluate(0, [eval_reply(10 + i, source=i, loss=5.0) for i in range(3)])
    s.aggregate_evaluate(1, [eval_reply(10 + i, source=i, loss=1.0 + i) for i in range(2)])
    _round(s, 2, [0.0, 0.0, 1.0])
    assert s.lam[0] == pytest.approx(s.lam[2]) and s.lam[1] > s.lam[0]


def test_drfa_samples_by_lambda_and_averages_over_draws() -> None:
    """lambda = (.2, .3, .5); with fraction_train 1 there are 3 draws a round. Over 2000 rounds
    the draws are proportional to lambda (chi-square, 2 d.o.f., 0.1% critical value 13.8)."""
    s = _strategy(DRO, mode="drfa", settings=DROSettings(max_step=1.0, eta=0.1, eps=0.1, cap=0.6))
    s.lam = np.array([0.2, 0.3, 0.5])
    counts = np.zeros(3)
    for r in range(1, 2001):
        nodes = s.sample_training_nodes(r, [10, 11, 12])
        assert nodes == sorted(10 + src for src in s.draws)
        for src, c in s.draws.items():
            counts[src] += c
    expected = 6000 * s.lam
    assert float(((counts - expected) ** 2 / expected).sum()) < 13.8, counts


def test_drfa_round_by_hand() -> None:
    """Draws {source 0: 2, source 2: 1}: the update is (2 * w0 + 1 * w2) / 3 = (0 + 2) / 3.
    Then lambda moves by AFL's ascent on the last validation losses (1, 2, 3), not on the
    loss-before of the sampled sources: the test_dro_math AFL round 1, (.243333, .333333,
    .423333)."""
    s = _strategy(DRO, mode="drfa", settings=DROSettings(max_step=1.0, eta=0.1, eps=0.1, cap=0.5))
    s.aggregate_evaluate(0, [eval_reply(10 + i, source=i, loss=1.0 + i) for i in range(3)])
    np.testing.assert_allclose(s.eval_loss, [1.0, 2.0, 3.0])
    s.draws = {0: 2, 2: 1}
    arrays = _round(s, 1, [9.0, 9.0, 9.0], nodes=(10, 12)).arrays
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 2.0 / 3.0), rtol=1e-6)
    np.testing.assert_allclose(s.lam, [0.243333, 0.333333, 0.423333], atol=1e-6)
    t = _strategy(DRO, mode="drfa")
    t.load_state_dict(s.state_dict())
    np.testing.assert_allclose(t.eval_loss, s.eval_loss)


# ---- baselines -----------------------------------------------------------------------------
def test_qfedavg_step_by_hand() -> None:
    """Global w = 0; updates w1 = 1 (loss-before F = 1), w2 = 2 (F = 4), equal clips, q = 1,
    L = 1 (client lr 1). Per element Delta w_k = L (w - w_k) = (-1, -2); over the 4 elements
    ||Delta w||^2 = (4, 16). Delta_k = F^q Delta w = (-1, -8); h_k = q F^(q-1) ||.||^2 + L F^q
    = (4 + 1, 16 + 4) = (5, 20). With p = (.5, .5): w = 0 - (-4.5 / 12.5) = 0.36.
    The integer array takes the clip-weighted mean. q = 0 gives FedAvg: (1 + 2) / 2 = 1.5."""
    s = _strategy(QFedAvg, q=1.0, client_lr=1.0)
    replies = [
        train_reply(10, _arrays(1.0), source=0, loss_before=1.0, train_loss=100.0),
        train_reply(11, _arrays(2.0), source=1, loss_before=4.0, train_loss=0.0),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 0.36), rtol=1e-6)
    assert arrays["w"].numpy().dtype == np.float32
    assert arrays["steps"].numpy().dtype == np.int64 and int(arrays["steps"].numpy()) == 4
    assert s.weights_by_source() == pytest.approx({0: 0.2, 1: 0.8, 2: 0.0})
    s0 = _strategy(QFedAvg, q=0.0, client_lr=1e-3)
    arrays, _ = s0.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 1.5), rtol=1e-6)


def test_feddg_ga_adjusts_weights_by_the_gap() -> None:
    """Round 1 mixes uniformly: (0 + 1 + 2) / 3 = 1. Local models' validation losses
    (.5, .5, .5) (their train losses, 9, must not be used), validation losses of the aggregate
    (.6, .9, .6): gaps (.1, .4, .1), d = .2 (R = 0: no decay): the test_dro_math example,
    weights (.233333, .533333, .233333). Round 2 mixes (0, 1, 2) with them:
    .533333 + 2 * .233333 = 1."""
    s = _strategy(FedDGGA, step=0.2)
    sent = list(s.configure_train(1, arrays_record(GLOBAL), ConfigRecord({}), FakeGrid([10])))
    assert sent[0].content[K.CONFIG][K.LOCAL_VAL] == 1
    replies = [train_reply(10 + i, _arrays(float(i)), source=i, train_loss=9.0) for i in range(3)]
    for m in replies:
        m.content[K.METRICS][K.LOCAL_VAL_LOSS] = 0.5
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 1.0), rtol=1e-6)
    s.aggregate_evaluate(
        1, [eval_reply(10 + i, source=i, loss=v) for i, v in enumerate([0.6, 0.9, 0.6])]
    )
    np.testing.assert_allclose(s.weights, [0.7 / 3, 1.6 / 3, 0.7 / 3], atol=1e-9)
    assert s.gaps == pytest.approx({0: 0.1, 1: 0.4, 2: 0.1})
    t = _strategy(FedDGGA, step=0.2)
    t.load_state_dict(s.state_dict())
    replies = [train_reply(10 + i, _arrays(float(i)), source=i) for i in range(3)]
    arrays, _ = t.aggregate_train(2, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 1.6 / 3 + 1.4 / 3), rtol=1e-6)


@pytest.mark.parametrize("mode", ["stats", "recompute", "all"])
def test_local_norm_flags_train_and_evaluate_configs(mode: str) -> None:
    s = _strategy(SourceFedAvg, local_norm=mode)
    grid = FakeGrid([10, 11, 12])
    config = ConfigRecord({"lr": 0.1})
    train = list(s.configure_train(1, arrays_record(GLOBAL), config, grid))
    assert all(m.content[K.CONFIG][K.LOCAL_NORM] == mode for m in train)
    evals = list(s.configure_evaluate(1, arrays_record(GLOBAL), config, grid))
    assert len(evals) == 3 and all(m.content[K.CONFIG][K.LOCAL_NORM] == mode for m in evals)
    assert K.LOCAL_NORM not in config  # the record start() reuses is left alone
    plain = _strategy(SourceFedAvg)
    assert all(
        K.LOCAL_NORM not in m.content[K.CONFIG]
        for m in plain.configure_train(1, arrays_record(GLOBAL), config, grid)
    )
    with pytest.raises(ValueError, match="local_norm"):
        _strategy(SourceFedAvg, local_norm="batch")


def test_fedbn_preset_keeps_every_norm_layer_local() -> None:

    s = build_strategy({"name": "fedbn"}, train_sources=[0, 1], source_names={0: "a", 1: "b"})
    assert s.local_norm == "all"


def _sent_w(msg: Message) -> np.ndarray:
    """The array "w" a message carries, as the ClientApp reads it (packed by default)."""
    return received(msg.content).state["w"].numpy()


def test_local_only_keeps_one_model_per_source() -> None:
    """Each node gets its own source's model; the global model is the uniform soup."""
    s = _strategy(LocalOnly)
    grid = FakeGrid([10, 11, 12])
    first = list(s.configure_train(1, arrays_record(GLOBAL), ConfigRecord({}), grid))
    assert all(np.all(_sent_w(m) == 0) for m in first)
    replies = [
        train_reply(10 + i, _arrays(float(i + 1)), source=i, num_examples=10 * (i + 1))
        for i in range(3)
    ]
    soup, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(soup["w"].numpy(), np.full((2, 2), 2.0))  # (1 + 2 + 3) / 3
    sent = {m.metadata.dst_node_id: m for m in s.configure_train(2, soup, ConfigRecord({}), grid)}
    for i in range(3):
        np.testing.assert_allclose(_sent_w(sent[10 + i]), i + 1.0)
    s.register_node(13, 3, heldout=True, clips=5)
    grid.node_ids.append(13)
    ev = {m.metadata.dst_node_id: m for m in s.configure_evaluate(1, soup, ConfigRecord({}), grid)}
    np.testing.assert_allclose(_sent_w(ev[11]), 2.0)
    np.testing.assert_allclose(_sent_w(ev[13]), 2.0)  # held out: soup
    np.testing.assert_allclose(_sent_w(ev[12]), 3.0)
    t = _strategy(LocalOnly)
    t.load_state_dict(s.state_dict())
    np.testing.assert_allclose(t.local[2]["w"].numpy(), 3.0)


# ---- every registered strategy, built from its config file -----------------------------------
STRATEGY_FILES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))


def test_every_strategy_file_names_a_registered_strategy() -> None:
    names = {compose([f"strategy={f}"]).strategy.name for f in STRATEGY_FILES}
    assert names == set(list_strategies())


@pytest.mark.parametrize("conf", STRATEGY_FILES)
def test_no_strategy_depends_on_reply_order(conf: str) -> None:
    """Replies arrive in whatever order the sites finish. Every strategy gives the same bits in
    any order: the mix (float32 sums are not associative: summed in another order, random
    weights differ in the last bit almost everywhere), the lambdas, and the evaluation rows and
    refusals in the order metrics.jsonl writes them."""
    cfg = compose([f"strategy={conf}", "rounds=3"]).strategy
    rng = np.random.default_rng(0)
    ints = np.array(4, dtype=np.int64)
    train = [
        train_reply(
            10 + s,
            {"w": rng.standard_normal(256).astype(np.float32), "steps": ints},
            source=s,
            loss_before=1.0 + 0.5 * s,
        )
        for s in range(3)
    ]
    evals = [eval_reply(10 + s, source=s, loss=2.0 - 0.25 * s, uar=0.2 * (s + 1)) for s in range(3)]
    evals.append(eval_reply(99, source=1, loss=1.0))  # an unknown node: refused
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        s = three_source_strategy(cfg, NAMES)
        s.current_arrays = arrays_record({"w": np.zeros(256, np.float32), "steps": ints})
        s.sample_training_nodes = lambda r, nodes: nodes  # DRFA: every source trains
        first = s.evaluate_round(0, [evals[i] for i in [*order, 3]][::-1])
        trained = s.train_round(1, [train[i] for i in order])
        second = s.evaluate_round(1, [evals[i] for i in [3, *order]])
        rejected = [*first.rejected, *trained.rejected, *second.rejected]
        results.append(
            (
                trained.arrays["w"].numpy().tobytes(),
                list(s.weights_by_source().items()),
                list(second.by_source.items()),
                [r.node for r in rejected],
            )
        )
    assert [r.kind for r in rejected] == ["evaluate", "evaluate"]  # node 99, twice
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("conf", STRATEGY_FILES)
def test_every_strategy_runs_two_rounds_and_resumes(conf: str, tmp_path) -> None:
    """Built from its yaml: configure, aggregate 2 rounds with one silent source, evaluate,
    checkpoint with torch.save, and a fresh copy restored from it aggregates identically."""
    import torch

    cfg = compose([f"strategy={conf}", "rounds=3"]).strategy

    def build():
        return three_source_strategy(cfg, NAMES)

    grid = FakeGrid([10, 11, 12])
    s = build()
    arrays = arrays_record(GLOBAL)
    for r in (1, 2):
        sent = list(s.configure_train(r, arrays, ConfigRecord({"lr": 1e-3}), grid))
        nodes = sorted(m.metadata.dst_node_id for m in sent)[: 2 if r == 1 else 3]
        replies = [
            train_reply(n, _arrays(0.01 * (n - 9) * r), source=n - 10, loss_before=1.0 + n - 10)
            for n in nodes
        ]
        new, _ = s.aggregate_train(r, replies)
        arrays = new or arrays
        s.aggregate_evaluate(
            r, [eval_reply(n, source=n - 10, loss=2.0 - 0.1 * r) for n in (10, 11, 12)]
        )
        weights = s.weights_by_source()
        assert set(weights) == {0, 1, 2} and sum(weights.values()) == pytest.approx(1.0)
    torch.save(s.state_dict(), tmp_path / "state.pt")
    t = build()
    t.load_state_dict(load_torch_file(tmp_path / "state.pt", "a strategy's own state"))
    t.current_arrays = s.current_arrays = arrays
    replies = [train_reply(n, _arrays(0.05 * (n - 9)), source=n - 10) for n in (10, 11, 12)]
    for x in (s, t):
        sent = list(x.configure_train(3, arrays, ConfigRecord({"lr": 1e-3}), grid))
        assert sent
    a, _ = s.aggregate_train(3, replies)
    b, _ = t.aggregate_train(3, replies)
    np.testing.assert_array_equal(a["w"].numpy(), b["w"].numpy())


def test_a_new_dro_mode_is_one_function_and_one_preset(tmp_path, monkeypatch) -> None:
    """A toy mode registered here (weights proportional to the losses) and a preset written to
    a tmp config folder: composed by name, built by build_strategy, run for a round. Losses
    (1, 2, 3), eps 0, cap 1, max_step 1: lambda = (1, 2, 3) / 6 and the mix of w = (0, 1, 2)
    is 2/6 + 6/6 = 4/3; the evaluation reports those weights for the row's lambda."""
    monkeypatch.setattr(DRO_MODES, "_items", dict(DRO_MODES))  # the toy leaves with the test

    def proportional_step(lam, losses, mask, prior, settings):
        return losses / losses.sum()

    register_mode("toy", DROMode(proportional_step))
    (tmp_path / "strategy").mkdir()
    (tmp_path / "strategy" / "dro_toy.yaml").write_text(
        "defaults:\n  - dro\n  - _self_\ndro:\n  mode: toy\n  eps: 0.0\n  cap: 1.0\n"
        "  max_step: 1.0\n"
    )
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "strategy=dro_toy"]).strategy
    s = three_source_strategy(cfg, NAMES)
    assert isinstance(s, DRO) and s.mode == "toy"
    s.current_arrays = arrays_record(GLOBAL)
    out = _round(s, 1, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(s.lam, [1 / 6, 2 / 6, 3 / 6])
    np.testing.assert_allclose(out.arrays["w"].numpy(), np.full((2, 2), 4 / 3), rtol=1e-6)
    scored = s.evaluate_round(1, [eval_reply(10 + i, source=i, loss=1.0) for i in range(3)])
    assert scored.weights == pytest.approx({0: 1 / 6, 1: 2 / 6, 2: 3 / 6})


@pytest.mark.parametrize("cls", [SourceFedAvg, DRO])
@pytest.mark.parametrize("name", ["weighted_by_key", "min_available_nodes", "fraction_trian"])
def test_unknown_strategy_arguments_are_refused_by_name(cls, name) -> None:
    """FedAvg's own options do nothing here, and a typo must not pass silently."""
    with pytest.raises(TypeError, match=name):
        cls(train_sources=[0], source_names={0: "a"}, **{name: 1})


def test_fedbn_client_keeps_its_norm_layers_across_rounds() -> None:
    """The client side of FedBN: after a round the site's norm layers live in context.state;
    the next received model gets them back (conv weights stay the received ones). SiloBN keeps
    only the running statistics: the received affine parameters stay."""
    import torch
    from flwr.app import Context, RecordDict

    from client.handlers import restore_local_norm, save_local_norm
    from hdf.models.hdf_net import norm_state_keys

    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2), torch.nn.GroupNorm(1, 2)
    )
    assert norm_state_keys(model) == [
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "2.weight",
        "2.bias",
    ]
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    restore_local_norm(model, context)  # nothing kept yet: a no-op
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
        model[2].weight.fill_(5.0)
    save_local_norm(model, context)
    received = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(received)
    restore_local_norm(model, context)
    assert torch.all(model[1].running_mean == 3.0) and torch.all(model[2].weight == 5.0)
    assert torch.all(model[0].weight == 0.0)

    assert norm_state_keys(model, "stats") == [
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    ]
    silo = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    with torch.no_grad():
        model[1].running_var.fill_(7.0)
        model[1].weight.fill_(2.0)
    save_local_norm(model, silo, "stats")
    model.load_state_dict(received)
    restore_local_norm(model, silo)
    assert torch.all(model[1].running_mean == 3.0) and torch.all(model[1].running_var == 7.0)
    assert torch.all(model[1].weight == 0.0) and torch.all(model[2].weight == 0.0)


# ---- sequential FL: one site after another ---------------------------------------------------
def _visits(deltas: dict[int, float], bad: frozenset[int] = frozenset()):
    """An exchange whose site n adds deltas[n] to the "w" it receives and reports its buffer
    "mean" as 10 * n; a node in `bad` answers with a NaN model. Records (node, w received)."""
    seen: list[tuple[int, np.ndarray]] = []

    def exchange(msgs: list[Message]) -> list[Message]:
        out = []
        for m in msgs:
            node = m.metadata.dst_node_id
            w = _sent_w(m)
            seen.append((node, w.copy()))
            new = np.full_like(w, np.nan) if node in bad else w + deltas[node]
            arrays = {"w": new, "mean": np.full(2, 10.0 * node, np.float32)}
            out.append(train_reply(node, arrays, source=node - 10))
        return out

    return exchange, seen


SEQ_GLOBAL = {"w": np.zeros((2, 2), np.float32), "mean": np.zeros(2, np.float32)}


def _sequential(sizes=(10, 20, 30), **kw):
    from server.strategy import SourceSequential

    s = SourceSequential(
        train_sources=[0, 1, 2], source_names=NAMES, seed=3, buffers=["mean"], **kw
    )
    for node, src in [(10, 0), (11, 1), (12, 2)]:
        s.register_node(node, src, heldout=False, clips=sizes[src])
    return s


def test_sequential_sites_train_the_model_the_previous_site_returned() -> None:
    """Deltas 1, 2, 4: each site receives the sum of the deltas before it in the round's order,
    the round ends at 7 (FedAvg's mix would be (10 + 40 + 120) / 60), and the buffer is the
    clip-weighted mean of what the sites reported: (100 * 10 + 110 * 20 + 120 * 30) / 60."""
    s = _sequential()
    exchange, seen = _visits({10: 1.0, 11: 2.0, 12: 4.0})
    result, sent, replied = s.train_in_sequence(
        1, arrays_record(SEQ_GLOBAL), ConfigRecord({}), FakeGrid([10, 11, 12]), exchange
    )
    order = [n for n, _ in seen]
    assert sorted(order) == [10, 11, 12] and (sent, replied) == (3, 3)
    assert order == s.visit_order(1, [10, 11, 12])
    before = 0.0
    for node, w in seen:
        np.testing.assert_array_equal(w, np.full((2, 2), before))
        before += {10: 1.0, 11: 2.0, 12: 4.0}[node]
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.full((2, 2), 7.0))
    np.testing.assert_allclose(result.arrays["mean"].numpy(), np.full(2, 6800 / 60), rtol=1e-6)
    assert set(result.by_source) == {0, 1, 2} and result.rejected == ()
    assert s.weights_by_source() == pytest.approx({0: 1 / 6, 1: 2 / 6, 2: 3 / 6})
    assert s.current_arrays["w"].numpy().max() == 0.0  # the round's start model again


def test_sequential_order_is_fresh_each_round_and_fixed_by_seed_and_round() -> None:
    s, t = _sequential(), _sequential()
    nodes = list(range(10, 18))
    orders = [tuple(s.visit_order(r, nodes)) for r in range(1, 7)]
    assert all(sorted(o) == nodes for o in orders) and len(set(orders)) > 1
    assert orders == [tuple(t.visit_order(r, nodes)) for r in range(1, 7)]


def test_sequential_skips_a_refused_reply_and_the_next_site_gets_the_model_before_it() -> None:
    """Node 11 answers NaN: it is refused, the site after it receives what 11 was sent, and the
    round ends at 1 + 4."""
    s = _sequential()
    deltas = {10: 1.0, 11: 2.0, 12: 4.0}
    exchange, seen = _visits(deltas, bad=frozenset({11}))
    result, _, replied = s.train_in_sequence(
        1, arrays_record(SEQ_GLOBAL), ConfigRecord({}), FakeGrid([10, 11, 12]), exchange
    )
    assert replied == 3 and [r.node for r in result.rejected] == [11]
    total = 0.0
    for node, w in seen:
        np.testing.assert_array_equal(w, np.full((2, 2), total))
        total += 0.0 if node == 11 else deltas[node]
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.full((2, 2), 5.0))
    assert set(result.by_source) == {0, 2}


def test_sequential_server_step_is_taken_once_from_the_round_start() -> None:
    """A server lr of 2 doubles the round's whole move (0 -> 7 gives 14), not each visit's, and
    leaves the averaged buffer as it is."""
    from server.strategy import ServerOptimizer, ServerOptSettings

    opt = ServerOptimizer(ServerOptSettings(name="none", lr=2.0), buffers=["mean"])
    s = _sequential(server_opt=opt)
    exchange, _ = _visits({10: 1.0, 11: 2.0, 12: 4.0})
    result, _, _ = s.train_in_sequence(
        1, arrays_record(SEQ_GLOBAL), ConfigRecord({}), FakeGrid([10, 11, 12]), exchange
    )
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.full((2, 2), 14.0))
    np.testing.assert_allclose(result.arrays["mean"].numpy(), np.full(2, 6800 / 60), rtol=1e-6)


def test_sequential_keeps_the_previous_model_with_too_few_accepted_visits() -> None:
    s = _sequential(min_train_replies=3)
    exchange, _ = _visits({10: 1.0, 11: 2.0, 12: 4.0}, bad=frozenset({12}))
    result, _, _ = s.train_in_sequence(
        1, arrays_record(SEQ_GLOBAL), ConfigRecord({}), FakeGrid([10, 11, 12]), exchange
    )
    assert result.arrays is None and result.summary is None
