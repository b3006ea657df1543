"""Test-time adaptation (hdf/adapt.py): AdaBN's statistics by hand, TENT's reach, no labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from hdf.adapt import adapt, check_adapt, check_methods, unlabeled_batches
from hdf.config import compose, model_settings
from hdf.config.schema import AdaptConfig
from hdf.models import build_model
from hdf.models.hdf_net import NORM_TYPES

CPU = torch.device("cpu")


class Poison:
    """A label that fails the test the moment anything reads it."""

    def _read(self, *args: object) -> None:
        raise AssertionError("the adaptation read a label")

    __int__ = __index__ = __float__ = __bool__ = __eq__ = __hash__ = __array__ = _read


class NoLabels(Dataset):
    """Clips whose labels cannot be read: items (clip, Poison(), 0); `labels` raises."""

    def __init__(self, clips: torch.Tensor) -> None:
        self.clips = clips

    @property
    def labels(self) -> np.ndarray:
        raise AssertionError("the adaptation read the label array")

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Poison, int]:
        return self.clips[i], Poison(), 0


class Tiny(nn.Module):
    """dropout -> 1x1x1 conv -> BatchNorm -> mean pool -> head: BN's input is easy to compute
    by hand (the dropout must stay off while adapting)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.conv = nn.Conv3d(3, 2, 1, bias=False)
        self.bn = nn.BatchNorm3d(2)
        self.head = nn.Linear(2, 7)

    def preprocess(self, clips: torch.Tensor) -> torch.Tensor:
        return clips.float().div(255).permute(0, 2, 1, 3, 4)  # B x C x T x H x W

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.bn(self.conv(self.drop(x))).mean(dim=(2, 3, 4))
        return self.head(f), f


def _clips(n: int, t: int = 2, size: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, 3, size, size), generator=g, dtype=torch.uint8)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adabn_statistics_by_hand_and_nothing_else_changes() -> None:
    """6 clips in 2 batches of 3. The conv output z (per channel, over N x T x H x W) of each
    batch has mean m_b and unbiased variance v_b; AdaBN's running stats are (m_1 + m_2) / 2 and
    (v_1 + v_2) / 2 (one pass, cumulative average), whatever they were before. Every parameter
    is unchanged, and so is the BN momentum; the model is back in eval mode."""
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(5.0)
        model.bn.running_var.fill_(7.0)
        model.bn.num_batches_tracked.fill_(10)
        model.bn.weight.mul_(1.5)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    clips = _clips(6)
    info = adapt(model, unlabeled_batches(NoLabels(clips), 3), "bn", CPU)
    assert info == {"method": "bn", "clips": 6}
    with torch.no_grad():
        means, variances = [], []
        for b in (clips[:3], clips[3:]):
            z = model.conv(model.preprocess(b)).transpose(0, 1).reshape(2, -1)
            means.append(z.mean(dim=1))
            variances.append(z.var(dim=1, unbiased=True))
    torch.testing.assert_close(model.bn.running_mean, (means[0] + means[1]) / 2)
    torch.testing.assert_close(model.bn.running_var, (variances[0] + variances[1]) / 2)
    assert int(model.bn.num_batches_tracked) == 2
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]), k
    assert model.bn.momentum == 0.1 and not model.training


def test_adabn_on_hdfnet_changes_only_batchnorm_statistics() -> None:
    cfg = compose(["experiment=tiny"])
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size).eval()
    before = _state(model)
    adapt(model, unlabeled_batches(NoLabels(_clips(10, 4, 32)), 4), "bn", CPU)
    after = _state(model)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(before[k], after[k]) for k in stats)
    for k in before:
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(before[k], after[k]), k


def test_tent_changes_only_normalisation_affine_parameters() -> None:
    """TENT (3 steps, lr 1e-2) on the tiny HDFNet: norm weights and biases move, every other
    parameter and buffer except BN statistics is bit-identical, requires_grad is restored, the
    entropy of the first batch goes down, and no label is ever read."""
    cfg = compose(["experiment=tiny"])
    torch.manual_seed(0)
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)  # confident, so the entropy has a gradient worth following
    affine = {
        f"{n}.{p}" if n else p
        for n, m in model.named_modules()
        if isinstance(m, NORM_TYPES)
        for p in ("weight", "bias")
        if getattr(m, p, None) is not None
    }
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    before = _state(model)
    clips = unlabeled_batches(NoLabels(_clips(4, 4, 32)), 4)
    info = adapt(model, clips, "tent", CPU, AdaptConfig(tent_steps=3, tent_lr=1e-2))
    assert info["steps"] == 3 and info["entropy_last"] < info["entropy_first"]
    after = _state(model)
    assert affine and any(not torch.equal(before[k], after[k]) for k in affine)
    for k in before:
        if k not in affine and not k.endswith(
            ("running_mean", "running_var", "num_batches_tracked")
        ):
            assert torch.equal(before[k], after[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert not model.training


def test_none_changes_nothing_and_bad_requests_are_named() -> None:
    model = Tiny()
    before = _state(model)
    assert adapt(model, unlabeled_batches(NoLabels(_clips(2)), 2), "none", CPU) == {
        "method": "none"
    }
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    grouped = nn.Module()
    grouped.norm = nn.GroupNorm(1, 2)
    with pytest.raises(ValueError, match="no BatchNorm layers"):
        adapt(grouped, [], "bn", CPU)
    with pytest.raises(ValueError, match="unknown adaptation method 'ttt'"):
        adapt(model, [], "ttt", CPU)
    with pytest.raises(ValueError, match="empty"):
        adapt(Tiny(), [], "bn", CPU)
    assert check_methods(["none", "bn", "tent", "bn"]) == ["bn", "tent"]
    with pytest.raises(ValueError, match="unknown adaptation method 'ada'"):
        check_methods(["ada"])
    with pytest.raises(ValueError, match=r"adapt\.tent_steps=0"):
        check_adapt(AdaptConfig(tent_steps=0))
