"""Server optimisers on the pseudo-gradient mix - global: hand-computed steps, buffers, state."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from hdf.config import compose
from server.strategy import ServerOptimizer, ServerOptSettings, SourceFedAvg
from server.strategy.server_opt import adam_step, avgm_step, sign_agreement_mask
from tests.fedmock import FakeGrid, arrays_record, three_source_strategy, train_reply

X0 = np.array([1.0, 2.0])


def _run(opt: ServerOptimizer, x: np.ndarray, deltas: list[np.ndarray]) -> list[np.ndarray]:
    """The global model after each step, the mix of each step being x + delta."""
    out = []
    for d in deltas:
        new = opt.step(arrays_record({"w": x}), arrays_record({"w": x + d}))
        x = new["w"].numpy()
        out.append(x)
    return out


def test_fedavgm_by_hand() -> None:
    """lr 0.5, momentum 0.9: m1 = d1 = (.5, -1), x1 = (1.25, 1.5); m2 = .9 m1 + (1, 1) =
    (1.45, .1), x2 = x1 + .5 m2 = (1.975, 1.55)."""
    opt = ServerOptimizer(ServerOptSettings("avgm", lr=0.5, momentum=0.9))
    x1, x2 = _run(opt, X0, [np.array([0.5, -1.0]), np.array([1.0, 1.0])])
    np.testing.assert_allclose(x1, [1.25, 1.5])
    np.testing.assert_allclose(x2, [1.975, 1.55])
    np.testing.assert_allclose(opt.m["w"], [1.45, 0.1])
    y, m = avgm_step(X0, np.array([1.0, 0.0]), np.array([2.0, 2.0]), lr=1.0, momentum=0.5)
    np.testing.assert_allclose(m, [2.0, 1.0])
    np.testing.assert_allclose(y, [3.0, 3.0])


def test_fedadam_by_hand() -> None:
    """lr .1, b1 .9, b2 .99, tau 1e-3, d1 = (.2, -.4): m = (.02, -.04), v = (4e-4, 1.6e-3),
    sqrt v = (.02, .04), x1 = x0 + .1 (.02 / .021, -.04 / .041). d2 = (.01, .4): m = (.019, .004),
    v = (.99 * 4e-4 + 1e-6, .99 * 1.6e-3 + 1.6e-3) = (3.97e-4, 3.184e-3)."""
    opt = ServerOptimizer(ServerOptSettings("adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3))
    x1, x2 = _run(opt, X0, [np.array([0.2, -0.4]), np.array([0.01, 0.4])])
    np.testing.assert_allclose(x1, [1.0 + 0.1 * 0.02 / 0.021, 2.0 - 0.1 * 0.04 / 0.041])
    np.testing.assert_allclose(opt.m["w"], [0.019, 0.004])
    np.testing.assert_allclose(opt.v["w"], [3.97e-4, 3.184e-3])
    step = 0.1 * np.array([0.019, 0.004]) / (np.sqrt([3.97e-4, 3.184e-3]) + 1e-3)
    np.testing.assert_allclose(x2, x1 + step)


def test_fedyogi_by_hand() -> None:
    """Same deltas: v1 = .01 d1^2 as Adam's; then v1 - d2^2 = (3e-4 > 0, -.1584 < 0), so
    v2 = v1 - .01 d2^2 sign(.) = (4e-4 - 1e-6, 1.6e-3 + 1.6e-3) = (3.99e-4, 3.2e-3)."""
    opt = ServerOptimizer(ServerOptSettings("yogi", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3))
    x1, x2 = _run(opt, X0, [np.array([0.2, -0.4]), np.array([0.01, 0.4])])
    np.testing.assert_allclose(opt.v["w"], [3.99e-4, 3.2e-3])
    step = 0.1 * np.array([0.019, 0.004]) / (np.sqrt([3.99e-4, 3.2e-3]) + 1e-3)
    np.testing.assert_allclose(x2, x1 + step)
    _, _, v = adam_step(X0, np.ones(2), np.zeros(2), np.array([4.0, 0.25]), 1.0, 0.9, 0.5, 1.0)
    np.testing.assert_allclose(v, [2.5, 0.625])  # Adam: .5 v + .5 * 1
    _, _, v = adam_step(
        X0, np.ones(2), np.zeros(2), np.array([4.0, 0.25]), 1.0, 0.9, 0.5, 1.0, yogi=True
    )
    np.testing.assert_allclose(v, [3.5, 0.75])  # Yogi: v - .5 * 1 * sign(v - 1)


def test_none_with_a_server_lr_damps_the_step_and_lr_one_is_the_mix() -> None:
    opt = ServerOptimizer(ServerOptSettings("none", lr=0.5))
    (x1,) = _run(opt, X0, [np.array([1.0, -2.0])])
    np.testing.assert_allclose(x1, [1.5, 1.0])
    assert ServerOptimizer(ServerOptSettings(lr=1.0)).identity
    assert not ServerOptimizer(ServerOptSettings()).identity  # the default steps 2x the mix


def test_buffers_and_integers_take_the_mix() -> None:
    """BatchNorm statistics and counters are not stepped: they take the mix as it is."""
    opt = ServerOptimizer(ServerOptSettings("adam", lr=0.1), buffers=["bn.running_var"])
    old = {
        "w": np.array([1.0], dtype=np.float32),
        "bn.running_var": np.array([1.0, 4.0], dtype=np.float32),
        "bn.num_batches_tracked": np.array(3, dtype=np.int64),
    }
    mix = {
        "w": np.array([1.5], dtype=np.float32),
        "bn.running_var": np.array([2.0, 2.0], dtype=np.float32),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
    }
    new = opt.step(arrays_record(old), arrays_record(mix))
    np.testing.assert_array_equal(new["bn.running_var"].numpy(), [2.0, 2.0])
    assert int(new["bn.num_batches_tracked"].numpy()) == 5
    assert new["w"].numpy().dtype == np.float32
    np.testing.assert_allclose(new["w"].numpy(), 1.0 + 0.1 * 0.05 / (np.sqrt(0.0025) + 1e-3))
    assert set(opt.m) == {"w"}


def test_state_round_trip_continues_bit_exactly(tmp_path) -> None:
    import torch

    settings = ServerOptSettings("yogi", lr=0.03)
    a = ServerOptimizer(settings)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=5).astype(np.float32) for _ in range(3)]
    x = rng.normal(size=5).astype(np.float32)
    (x1,) = _run(a, x, deltas[:1])
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = ServerOptimizer(settings)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=False))
    ya = _run(a, x1, deltas[1:])
    yb = _run(b, x1, deltas[1:])
    for p, q in zip(ya, yb, strict=True):
        np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError, match=r"server_opt\.name"):
        ServerOptimizer(ServerOptSettings("adam")).load_state_dict(a.state_dict())


def test_settings_are_checked_and_unknown_keys_named() -> None:
    with pytest.raises(ValueError, match=r"unknown server_opt\.name"):
        ServerOptSettings("sgdm")
    with pytest.raises(ValueError, match="beta2"):
        ServerOptSettings("adam", beta2=1.0)
    with pytest.raises(ValueError, match=r"\['momentm'\]"):
        ServerOptSettings.from_config({"name": "avgm", "momentm": 0.9})
    cfg = compose([]).server_opt
    assert ServerOptSettings.from_config(cfg) == ServerOptSettings()  # the default is FedAvg's


NAMES = {0: "a", 1: "b", 2: "c"}


@pytest.mark.parametrize("conf", ["fedavg", "dro", "dro_cvar", "qfedavg", "fedbn"])
def test_every_strategy_steps_its_own_mix(conf: str) -> None:
    """The hook sits after each strategy's mix: with FedAvgM (lr 1, momentum .5) round 1 is the
    strategy's own mix, round 2 is mix + .5 * (round 1's step)."""
    cfg = compose([f"strategy={conf}"]).strategy

    def build(opt: ServerOptimizer | None) -> SourceFedAvg:
        return three_source_strategy(cfg, NAMES, server_opt=opt)

    plain = build(None)
    withm = build(ServerOptimizer(ServerOptSettings("avgm", lr=1.0, momentum=0.5)))
    grid = FakeGrid([10, 11, 12])
    x = {"w": np.zeros(3)}
    steps = []
    for r in (1, 2):
        replies = [
            train_reply(n, {"w": x["w"] + 0.1 * (n - 9) * r}, source=n - 10, loss_before=n - 9.0)
            for n in (10, 11, 12)
        ]
        for s in (plain, withm):
            list(s.configure_train(r, arrays_record(x), ConfigRecord({"lr": 1e-3}), grid))
        mix = plain.aggregate_train(r, replies)[0]["w"].numpy()
        got = withm.aggregate_train(r, replies)[0]["w"].numpy()
        expected = mix + (0.5 * steps[-1] if steps else 0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        steps.append(got - x["w"])
        x = {"w": got}


def test_dro_server_lr_moved_to_server_opt() -> None:
    """The old key is refused before anything is built, and the error names its replacement."""
    with pytest.raises(
        ValueError, match=r"strategy\.dro\.server_lr was replaced by server_opt\.lr"
    ):
        compose(["strategy=dro", "+strategy.dro.server_lr=0.5"])


def test_sign_agreement_mask_by_hand() -> None:
    """x = 0; three sites' models u: the signs per weight sum to (3, 1, -1, 1), so A = (1, 1/3,
    1/3, 1/3); with mask_tau .5 the mask is (1, 1/3, 1/3, 1/3) and with 1/3 it is all ones. The
    mix is the mean (4/3, 1/3, -1/3, 4/3); lr 2 steps 2 * mask * mix. Buffers take the mix."""
    u = [np.array([1.0, 1, -1, 2]), np.array([1.0, -1, -1, 3]), np.array([2.0, 1, 1, -1])]
    np.testing.assert_allclose(sign_agreement_mask(np.zeros(4), u, 0.5), [1, 1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(sign_agreement_mask(np.zeros(4), u, 1 / 3), [1, 1, 1, 1])
    opt = ServerOptimizer(ServerOptSettings("none", lr=2.0, mask_tau=0.5), buffers=["bn"])
    assert not ServerOptimizer(ServerOptSettings("none", lr=1.0, mask_tau=0.5)).identity
    x = {"w": np.zeros(4), "bn": np.zeros(4)}
    mix = {"w": sum(u) / 3, "bn": sum(u) / 3}
    new = opt.step(
        arrays_record(x), arrays_record(mix), [arrays_record({"w": a, "bn": a}) for a in u]
    )
    np.testing.assert_allclose(new["w"].numpy(), [8 / 3, 2 / 9, -2 / 9, 8 / 9])
    np.testing.assert_allclose(new["bn"].numpy(), mix["bn"])
    with pytest.raises(ValueError, match="mask_tau"):
        ServerOptSettings(mask_tau=0.0)


def test_strategy_hands_its_replies_to_the_mask() -> None:
    """FedAvg (clips 10, 20, 30) with mask_tau 1: a weight every site moves the same way steps;
    weight 0 all three move up (mix .4), weight 1 one moves down (A = 1/3; mix .1, step .1/3)."""
    cfg = compose(["strategy=fedavg"]).strategy
    opt = ServerOptimizer(ServerOptSettings("none", lr=1.0, mask_tau=1.0))
    strategy = three_source_strategy(cfg, NAMES, server_opt=opt)
    x = {"w": np.zeros(2)}
    list(
        strategy.configure_train(
            1, arrays_record(x), ConfigRecord({"lr": 1e-3}), FakeGrid([10, 11, 12])
        )
    )
    moves = {10: [0.3, 0.3], 11: [0.6, 0.3], 12: [0.3, -0.1]}
    replies = [
        train_reply(n, {"w": np.array(moves[n])}, source=n - 10, loss_before=1.0) for n in moves
    ]
    got = strategy.aggregate_train(1, replies)[0]["w"].numpy()
    np.testing.assert_allclose(got, [0.4, 0.1 / 3])
