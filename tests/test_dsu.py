"""DSU feature-statistics resampling: the formula by hand, when it applies, and where in HDFNet."""

from __future__ import annotations

import pytest
import torch

from hdf.config import model_settings
from hdf.models import build_model
from hdf.models.dsu import EPS, FeatureStatsNoise, resample_feature_stats

T, SIZE = 4, 32


def _model(dsu: float) -> torch.nn.Module:
    cfg = {"backbone": "tiny3d", "width": 8, "dropout": 0.0, "weights": None, "dsu": dsu}
    torch.manual_seed(0)
    return build_model(model_settings(cfg), T, SIZE)


def test_resampling_matches_a_hand_computation() -> None:
    # Two clips, one channel, four values each: statistics small enough to write down.
    x = torch.tensor([[[1.0, 3.0, 1.0, 3.0]], [[0.0, 4.0, 0.0, 4.0]]]).view(2, 1, 2, 2)
    n_mu = torch.tensor([[1.0], [-0.5]])
    n_sig = torch.tensor([[0.0], [2.0]])
    out = resample_feature_stats(x, n_mu, n_sig)
    # Per clip: means 2 and 2, unbiased variances 4/3 and 16/3, so stds 1.1547 and 2.3094.
    mu = torch.tensor([2.0, 2.0])
    sig = torch.tensor([4 / 3, 16 / 3]).add(EPS).sqrt()
    # Over the batch (unbiased, 2 clips): var(mu) = 0, var(sig) = (sig1 - sig0)^2 / 2.
    spread_mu = torch.tensor(EPS).sqrt()
    spread_sig = ((sig[1] - sig[0]) ** 2 / 2 + EPS).sqrt()
    beta = mu + torch.tensor([1.0, -0.5]) * spread_mu
    gamma = sig + torch.tensor([0.0, 2.0]) * spread_sig
    for i in range(2):
        want = (x[i, 0] - mu[i]) / sig[i] * gamma[i] + beta[i]
        torch.testing.assert_close(out[i, 0], want)
    # Clip 0 keeps its style (no noise on its std, a tiny one on its mean); clip 1's std grows.
    assert out[1].std() > x[1].std() * 1.5


def test_zero_noise_keeps_the_features() -> None:
    x = torch.randn(3, 4, 2, 5, 5)
    zero = torch.zeros(3, 4)
    torch.testing.assert_close(resample_feature_stats(x, zero, zero), x, atol=1e-4, rtol=1e-4)


def test_applies_only_in_training_with_its_probability() -> None:
    x = torch.randn(4, 3, 2, 6, 6)
    dsu = FeatureStatsNoise(1.0)
    assert not torch.equal(dsu(x), x)
    assert torch.equal(dsu.eval()(x), x)
    assert torch.equal(FeatureStatsNoise(1.0)(x[:1]), x[:1])  # one clip: no batch spread
    off = FeatureStatsNoise(0.0)
    state = torch.get_rng_state()
    assert torch.equal(off(x), x)
    assert torch.equal(torch.get_rng_state(), state)  # off draws nothing: old runs repeat
    half = FeatureStatsNoise(0.5)
    torch.manual_seed(1)
    changed = sum(not torch.equal(half(x), x) for _ in range(400))
    assert 150 < changed < 250


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_probability_is_refused_by_name(p: float) -> None:
    with pytest.raises(ValueError, match=r"model\.dsu"):
        FeatureStatsNoise(p)


def test_hdfnet_with_dsu_keeps_its_state_dict_and_eval_output() -> None:
    plain, noisy = _model(0.0), _model(1.0)
    assert plain.state_dict().keys() == noisy.state_dict().keys()
    noisy.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, T, SIZE, SIZE)
    plain.eval(), noisy.eval()
    torch.testing.assert_close(noisy(x)[0], plain(x)[0])


def test_hdfnet_with_dsu_restyles_early_stages_in_training() -> None:
    plain, noisy = _model(0.0), _model(1.0)
    noisy.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, T, SIZE, SIZE)
    torch.manual_seed(2)
    logits, _ = noisy(x)
    logits.sum().backward()
    assert all(p.grad is not None for p in noisy.parameters() if p.requires_grad)
    plain_logits, _ = plain(x)
    assert not torch.allclose(logits, plain_logits)
    calls: list[int] = []
    noisy.dsu.register_forward_hook(lambda m, i, o: calls.append(1))
    noisy(x)
    assert len(calls) == len(noisy.stage_names)  # after the stem and every stage but the last
