"""Client optimiser state across rounds: kept, used, checked, and dropped when it no longer fits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Context, MessageType, RecordDict

from client.optimizer_state import restore_optimizer_state, save_optimizer_state
from hdf import contract as K
from hdf.config import model_settings
from hdf.config.schema import DSMConfig, RunConfig, SAMConfig, TrainConfig
from hdf.data.source import TensorClipDataset
from hdf.losses.dsm import DSMLoss
from hdf.optim.base import OptimizerStateError, build_optimizer, export_state, import_state
from hdf.train import train_local
from tests.test_train import StandIn

CPU = torch.device("cpu")
LR, WD = 0.01, 0.05


def _data() -> TensorClipDataset:
    """8 clips, 3 classes: with batch_size 8 one epoch is exactly one step on every clip."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8) % 3
    clips = torch.randint(0, 255, (8, 2, 3, 4, 4), generator=g, dtype=torch.uint8)
    return TensorClipDataset(clips, labels.numpy(), source_index=0)


def _cfg(optimizer: str = "adamw", keep: bool = True) -> RunConfig:
    """Plain CE, no SAM, no augmentation, one constant lr: a step is an optimiser step alone."""
    return RunConfig(
        precision="fp32",
        train=TrainConfig(
            batch_size=8,
            weight_decay=WD,
            warmup_frac=0.0,
            min_lr_ratio=1.0,
            augment=False,
            optimizer=optimizer,
            momentum=0.9,
            keep_optimizer_state=keep,
        ),
        dsm=DSMConfig(supcon=False, ib=False, balance=False, alpha=1.0),
        sam=SAMConfig(enabled=False),
    )


def _grads(model: StandIn, data: TensorClipDataset, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The training loss gradient on the whole (one-batch) data set at the current weights."""
    m = copy.deepcopy(model)
    m.train()
    clips = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.as_tensor(data.labels)
    logits, features = m(m.preprocess(clips))
    loss, _ = DSMLoss(cfg.dsm)(logits, features, labels)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def test_adamw_state_survives_a_round_and_continues_by_hand() -> None:
    """Round 2's first step from the kept state equals AdamW continued by hand (t = 3, moments
    of rounds 1's two steps), and differs from the step a fresh AdamW takes."""
    torch.manual_seed(0)
    data, cfg = _data(), _cfg()
    model = StandIn()
    first = train_local(model, data, cfg, CPU, epochs=2, lr=LR, seed=0)
    state = first["optimizer_state"]
    assert float(state["head.weight::step"]) == 2.0
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model, data, cfg)
    fresh = copy.deepcopy(model)

    train_local(model, data, cfg, CPU, epochs=1, lr=LR, seed=1, optimizer_state=state)
    train_local(fresh, data, cfg, CPU, epochs=1, lr=LR, seed=1)

    b1, b2, eps, t = 0.9, 0.999, 1e-8, 3
    for name, p in model.named_parameters():
        if name == "conv.bias":  # BatchNorm removes it: its gradient is rounding noise, which
            continue  # Adam's normalised step amplifies
        g = grads[name]
        m = b1 * state[f"{name}::exp_avg"] + (1 - b1) * g
        v = b2 * state[f"{name}::exp_avg_sq"] + (1 - b2) * g * g
        expected = start[name] * (1 - LR * WD) - LR / (1 - b1**t) * m / (
            (v / (1 - b2**t)).sqrt() + eps
        )
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
    moved = dict(fresh.named_parameters())
    assert any(
        not torch.allclose(p, moved[n], rtol=1e-4, atol=1e-6) for n, p in model.named_parameters()
    )


def test_sgd_momentum_buffer_survives_a_round() -> None:
    """SGD + momentum: round 2's step is p - lr (mu buf + g + wd p) with round 1's buffer."""
    torch.manual_seed(0)
    data, cfg = _data(), _cfg("sgd")
    model = StandIn()
    state = train_local(model, data, cfg, CPU, epochs=1, lr=LR, seed=0)["optimizer_state"]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model, data, cfg)
    train_local(model, data, cfg, CPU, epochs=1, lr=LR, seed=1, optimizer_state=state)
    for name, p in model.named_parameters():
        buf = 0.9 * state[f"{name}::momentum_buffer"] + grads[name] + WD * start[name]
        torch.testing.assert_close(p.detach(), start[name] - LR * buf, rtol=1e-5, atol=1e-7)


def test_without_the_option_no_state_is_returned() -> None:
    stats = train_local(StandIn(), _data(), _cfg(keep=False), CPU, epochs=1, lr=LR, seed=0)
    assert "optimizer_state" not in stats


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update({"nope.weight::exp_avg": torch.zeros(1)}), "names no trainable"),
        (lambda s: s.update({"head.weight::exp_avg": torch.zeros(3, 3)}), "has shape"),
        (lambda s: s.update({"head.bias::exp_avg": torch.full((7,), float("nan"))}), "finite"),
        (lambda s: s.update({"head.bias::exp_avg": torch.zeros(7, dtype=torch.int64)}), "float"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_before_loading(edit, match) -> None:
    model = StandIn()
    opt = build_optimizer(model, "adamw", LR, WD, 0.9)
    model(model.preprocess(_data()[0][0][None])).__getitem__(0).sum().backward()
    opt.step()
    state = export_state(opt, model)
    edit(state)
    fresh = build_optimizer(model, "adamw", LR, WD, 0.9)
    with pytest.raises(OptimizerStateError, match=match):
        import_state(fresh, model, state)
    assert fresh.state_dict()["state"] == {}


def _context(run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_context_state_is_used_only_from_the_previous_round_of_the_same_run() -> None:
    ctx = _context()
    state = {"head.bias::exp_avg": torch.arange(7.0), "head.bias::step": torch.tensor(4.0)}
    save_optimizer_state(ctx, state, "run-a", 3, "adamw")
    got = restore_optimizer_state(ctx, "run-a", 4, "adamw")
    assert got is not None and torch.equal(got["head.bias::exp_avg"], torch.arange(7.0))
    for run, rnd, opt in [("run-b", 4, "adamw"), ("run-a", 5, "adamw"), ("run-a", 4, "sgd")]:
        save_optimizer_state(ctx, state, "run-a", 3, "adamw")
        assert restore_optimizer_state(ctx, run, rnd, opt) is None, (run, rnd, opt)
        assert K.OPTIMIZER_STATE not in ctx.state  # a stale state is forgotten, not kept
    assert restore_optimizer_state(_context(), "run-a", 1, "adamw") is None  # nothing saved


def test_client_keeps_its_optimizer_state_in_context_state(tmp_path) -> None:
    """The ClientApp: round 1 leaves the AdamW state in context.state; round 2 continues it
    (step count = both rounds' steps); a round-2 message to a new context starts afresh."""
    from client.app import app
    from hdf.config import compose, to_yaml
    from hdf.models import build_model
    from tests.fedmock import instruction

    cfg = compose(["experiment=tiny", f"data.root={tmp_path}", "train.keep_optimizer_state=true"])
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)

    def message(server_round: int):
        from flwr.app import ArrayRecord, ConfigRecord

        config = ConfigRecord(
            {
                K.RUN_CONFIG: to_yaml(cfg),
                K.SERVER_ROUND: server_round,
                K.LOCAL_EPOCHS: 1,
                K.LR: 1e-3,
            }
        )
        content = RecordDict({K.ARRAYS: ArrayRecord(model.state_dict()), K.CONFIG: config})
        return instruction(1, content, MessageType.TRAIN)

    node = {"partition-id": 0, "num-partitions": 2}
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    app(message(1), ctx)
    kept = ctx.state.array_records[K.OPTIMIZER_STATE].to_torch_state_dict()
    steps = {float(v) for k, v in kept.items() if k.endswith("::step")}
    assert len(steps) == 1 and steps.pop() > 0
    one_round = float(kept["head.weight::step"])
    app(message(2), ctx)
    kept = ctx.state.array_records[K.OPTIMIZER_STATE].to_torch_state_dict()
    assert float(kept["head.weight::step"]) == 2 * one_round
    other = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    app(message(2), other)
    again = other.state.array_records[K.OPTIMIZER_STATE].to_torch_state_dict()
    assert float(again["head.weight::step"]) == one_round
    assert np.isfinite(float(kept["head.weight::exp_avg"].abs().sum()))


def test_centralized_carries_the_state_from_round_to_round(tmp_path, monkeypatch) -> None:
    """The pooled baseline hands each round's returned state to the next round's call."""
    import simulations.centralized as central
    from hdf.config import compose
    from hdf.runfolder.folder import RunFolder

    seen: list[object] = []

    def fake_train(*args, optimizer_state=None, **kwargs):
        seen.append(optimizer_state)
        return {"optimizer_state": {"x": torch.tensor(float(len(seen)))}}

    monkeypatch.setattr(central, "train_local", fake_train)
    monkeypatch.setattr(central, "score", lambda *a, **k: {})
    monkeypatch.setattr(central, "write_report", lambda run: None)
    cfg = compose(["experiment=tiny", f"data.root={tmp_path / 'd'}", "rounds=3"])
    central.train_centralized(cfg, RunFolder.create(tmp_path, "c"))
    assert seen[0] is None
    assert [float(s["x"]) for s in seen[1:]] == [1.0, 2.0]
