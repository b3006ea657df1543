"""DAM and its DCT bank: orthonormality, shapes for any C, T, H, W, gradients, identity when off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hdf.models.dam import DAM
from hdf.models.dct import dct_bank


def test_dct_bank_is_orthonormal() -> None:
    """The 49 bases, flattened, form an orthonormal basis of R^49; k = 7u + v ordering."""
    bank = dct_bank()
    assert bank.shape == (49, 7, 7)
    flat = bank.double().reshape(49, 49)
    torch.testing.assert_close(
        flat @ flat.t(), torch.eye(49, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # k = 0 is the constant 1/7; k = 48 (u = v = 6) has centre value (2/7) cos(3 pi)^2 = 2/7.
    torch.testing.assert_close(bank[0], torch.full((7, 7), 1 / 7))
    assert bank[48, 3, 3].item() == pytest.approx(2 / 7, abs=1e-6)
    # k = 1 (u = 0, v = 1) varies along rows only; k = 7 (u = 1, v = 0) along columns only.
    assert torch.allclose(bank[1], bank[1][:, :1].expand(7, 7))
    assert torch.allclose(bank[7], bank[7][:1, :].expand(7, 7))


@pytest.mark.parametrize(
    ("c", "t", "h", "w"),
    [(8, 4, 5, 6), (3, 16, 4, 4), (32, 8, 7, 7), (1, 1, 1, 1), (4, 6, 1, 9), (24, 16, 2, 2)],
)
def test_dam_shape_any_size(c: int, t: int, h: int, w: int) -> None:
    """Output has the input's shape B x C x T x H x W, including C < T and tiny H, W."""
    torch.manual_seed(0)
    x = torch.randn(2, c, t, h, w)
    y = DAM(c, t)(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_dam_gradients_reach_every_parameter() -> None:
    """Every DAM parameter and the input get a non-zero, finite gradient."""
    torch.manual_seed(0)
    dam = DAM(12, 5)
    x = torch.randn(3, 12, 5, 6, 7, requires_grad=True)
    (dam(x) * torch.randn(3, 12, 5, 6, 7)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in dam.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dam_gradient_matches_finite_differences() -> None:
    """The fused descriptor backward agrees with numerical gradients (float64)."""
    torch.manual_seed(0)
    dam = DAM(5, 3).double()
    x = torch.randn(2, 5, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dam, (x,))


def test_dam_both_branches_off_is_identity() -> None:
    """With both branches off the module is the identity and has no parameters."""
    dam = DAM(6, 4, temporal=False, frequency=False)
    x = torch.randn(2, 6, 4, 5, 5)
    assert torch.equal(dam(x), x)
    assert not list(dam.parameters())


@pytest.mark.parametrize(("temporal", "frequency"), [(True, False), (False, True)])
def test_dam_single_branch(temporal: bool, frequency: bool) -> None:
    """One branch alone: shape kept, gate in (1, 2) so |y| is between |x| and 2|x|."""
    torch.manual_seed(0)
    dam = DAM(6, 4, temporal=temporal, frequency=frequency)
    x = torch.randn(2, 6, 4, 5, 5)
    y = dam(x)
    ratio = y / x
    assert y.shape == x.shape
    assert (ratio > 1).all() and (ratio < 2).all()


def test_robust_fusion_differences_along_time() -> None:
    """The "Compensate" term |A_t - A_{t-1}| is taken along time (the released code used groups)."""
    fusion = DAM(4, 3, frequency=False).temporal.robust  # type: ignore[union-attr]
    with torch.no_grad():
        fusion.gamma.zero_()  # leave only -D inside the sigmoid (delta starts at 0)
    varies_over_groups = torch.tensor([[[1.0, 5.0, -2.0]] * 3])  # B x T x G, constant in time
    out = fusion(varies_over_groups, varies_over_groups)
    torch.testing.assert_close(out, torch.full_like(out, 0.5))
    varies_over_time = torch.tensor([[[0.0] * 3, [1.0] * 3, [3.0] * 3]])
    out = fusion(varies_over_time, varies_over_time)
    expected = torch.sigmoid(-torch.tensor([0.0, 1.0, 2.0]))[None, :, None].expand(1, 3, 3)
    torch.testing.assert_close(out, expected)


def test_dam_dct_is_a_buffer_and_moves_with_the_module() -> None:
    """The DCT bank is a (non-trainable) buffer saved in the state dict."""
    dam = DAM(4, 4)
    assert "frequency.dct" in dict(dam.named_buffers())
    assert "frequency.dct" in dam.state_dict()
    assert not any(n.endswith("dct") for n, _ in dam.named_parameters())
    dam = dam.to(torch.float64)
    assert dam.frequency is not None and dam.frequency.dct.dtype == torch.float64


def test_dam_rejects_wrong_shape() -> None:
    """A clip of the wrong length or width is refused with a message naming both."""
    with pytest.raises(ValueError, match="expects"):
        DAM(4, 4)(torch.randn(1, 4, 3, 2, 2))


def test_dam_bf16_autocast_cpu() -> None:
    """Forward and backward run under CPU bf16 autocast with finite results."""
    torch.manual_seed(0)
    dam = DAM(8, 4)
    x = torch.randn(2, 8, 4, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dam(x.to(torch.bfloat16))
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_dam_in_a_sequential_trains() -> None:
    """A conv + DAM stack takes an optimizer step without error (smoke)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), DAM(8, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(2, 3, 4, 8, 8)).square().mean().backward()
    opt.step()
