"""DAM and its DCT bank: an independent reference, orthonormality, shapes, gradients, switches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdf.models.dam import DAM, conv_to_one_channel
from hdf.models.dct import dct_bank

# The released initial values (docs/hdf_method.md, DAM table), written out here so that a changed
# initialisation in dam.py fails the reference test instead of being read back from the module.
RELEASED_INIT = {
    "temporal.robust.gamma": 1.0,
    "temporal.robust.delta": 0.0,
    "temporal.robust.alpha": 0.5,
    "temporal.robust.beta": 0.5,
    "frequency.noise_scale": 1.0,
    "frequency.dev_scale": 0.0,
    "frequency.alpha": 0.5,
    "frequency.beta": 0.5,
    "frequency.fit.alpha": 0.5,
    "frequency.fit.weight": 1.0,
    "frequency.fit.bias": 0.0,
    "w_t": 0.8,
    "w_s": 0.3,
}
WASSERSTEIN_REG = 0.05  # the released DROAdversarialBranch's constant
EPS = 1e-6  # the released AdaptiveDynamicTanh's eps


def _dct_by_loops(n: int = 7) -> torch.Tensor:
    """B_k(i, j) = c(u) c(v) cos(pi (2i+1) v / 2n) cos(pi (2j+1) u / 2n), k = n u + v, by loops."""
    bank = torch.empty(n * n, n, n, dtype=torch.float64)
    for u in range(n):
        for v in range(n):
            cu = math.sqrt((1 if u == 0 else 2) / n)
            cv = math.sqrt((1 if v == 0 else 2) / n)
            for i in range(n):
                for j in range(n):
                    bank[n * u + v, i, j] = (
                        cu
                        * cv
                        * math.cos(math.pi * (2 * i + 1) * v / (2 * n))
                        * math.cos(math.pi * (2 * j + 1) * u / (2 * n))
                    )
    return bank


def _reference_dam(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """DAM written from docs/hdf_method.md with plain ops (B x C x T x H x W, float64).

    The released module with our documented departures: channels pooled into G = min(C, T)
    groups by adaptive pooling, the temporal difference along time, the DCT of the channel mean
    by a real Conv2d, the attention softmax over the keys, FreConv a real Conv2d.
    """
    b, c, t = x.shape[:3]
    out = {}
    if "temporal.fc_t.weight" in p:
        groups = min(c, t)
        # adaptive avg / max pooling of (C, H, W) into (G, 1, 1) per frame, as the release does
        frames = x.transpose(1, 2)  # B x T x C x H x W
        a = F.adaptive_avg_pool3d(frames, (groups, 1, 1)).reshape(b, t, groups)
        m = F.adaptive_max_pool3d(frames, (groups, 1, 1)).reshape(b, t, groups)
        wd = (a - a.mean(dim=2, keepdim=True)).norm(dim=2, keepdim=True)
        d = torch.zeros_like(a)
        d[:, 1:] = (a[:, 1:] - a[:, :-1]).abs()
        fused = p["temporal.robust.alpha"] * a + p["temporal.robust.beta"] * m
        gate = torch.sigmoid(
            p["temporal.robust.gamma"] * fused + p["temporal.robust.delta"] * wd - d
        )
        q_in = F.linear(gate.transpose(1, 2), p["temporal.fc_t.weight"]).transpose(1, 2)
        q = F.linear(q_in, p["temporal.q.weight"], p["temporal.q.bias"])
        k = F.linear(q_in, p["temporal.k.weight"], p["temporal.k.bias"])
        v = F.linear(q_in, p["temporal.v.weight"], p["temporal.v.bias"])
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(groups), dim=2)  # over keys
        g_t = torch.sigmoid((attn @ v).mean(dim=2))  # B x T
        out["t"] = x * g_t[:, None, :, None, None] + x
    if "frequency.noise" in p:
        bank = _dct_by_loops().float().to(x.dtype)  # the module's buffer is built in float32
        xbar = x.mean(dim=2).mean(dim=1, keepdim=True)  # mean over T, then over C: B x 1 x H x W
        dct = F.conv2d(xbar, bank[:, None], padding=3)  # B x 49 x H x W
        wf = (dct - dct.mean(dim=(2, 3), keepdim=True)).flatten(2).norm(dim=2)[..., None, None]
        noise = (p["frequency.noise"] * p["frequency.noise_scale"])[..., None]
        dev_scale = p["frequency.dev_scale"][..., None]
        delta = noise * dct.sign() + WASSERSTEIN_REG * dev_scale * wf * dct.sign()
        z = (p["frequency.alpha"] * dct + p["frequency.beta"] * (dct + delta)) / 2
        sigma = torch.sqrt(z.var(dim=1, keepdim=True) + EPS)  # unbiased, over the 49 channels
        z = torch.tanh(p["frequency.fit.alpha"] / (sigma + EPS) * z)
        z = z * p["frequency.fit.weight"][..., None] + p["frequency.fit.bias"][..., None]
        fmap = F.conv2d(z, p["frequency.attn.weight"], padding=3)  # B x 1 x H x W
        out["s"] = x * torch.sigmoid(fmap)[:, :, None] + x
    if len(out) == 2:
        return (p["w_t"] * out["t"] + p["w_s"] * out["s"]) / 2
    return next(iter(out.values()))


def _params(dam: DAM, *, released_init: bool) -> dict[str, torch.Tensor]:
    """The module's parameters, with the constant-initialised ones replaced by RELEASED_INIT.

    The values pass through float32, as the module's own do (it is built in float32, then cast).
    """
    params = {name: q.detach() for name, q in dam.named_parameters()}
    if released_init:
        for name in params.keys() & RELEASED_INIT.keys():
            value = torch.tensor(RELEASED_INIT[name], dtype=torch.float32).item()
            params[name] = torch.full_like(params[name], value)
    return params


DAM_SHAPES = [
    (12, 4, 6, 5),  # C a multiple of G = T: pooling by reshape
    (10, 4, 7, 7),  # C not a multiple of G: adaptive pooling
    (3, 5, 4, 9),  # C < T: G = C, one channel per group
]


@pytest.mark.parametrize(("c", "t", "h", "w"), DAM_SHAPES)
@pytest.mark.parametrize(("temporal", "frequency"), [(True, True), (True, False), (False, True)])
def test_dam_matches_an_independent_reference(
    c: int, t: int, h: int, w: int, temporal: bool, frequency: bool
) -> None:
    """DAM at its initialisation equals the reference with the released initial values; then,
    with every parameter randomised (so the Wasserstein terms and all gates are live), equals the
    reference with the module's own parameters (float64)."""
    torch.manual_seed(0)
    dam = DAM(c, t, temporal=temporal, frequency=frequency).double()
    x = torch.randn(2, c, t, h, w, dtype=torch.float64)
    torch.testing.assert_close(
        dam(x), _reference_dam(x, _params(dam, released_init=True)), rtol=1e-10, atol=1e-10
    )
    with torch.no_grad():
        for q in dam.parameters():
            q.copy_(torch.randn_like(q) * 0.5)
    torch.testing.assert_close(
        dam(x), _reference_dam(x, _params(dam, released_init=False)), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize(("c", "t", "h", "w"), DAM_SHAPES)
@pytest.mark.parametrize(("temporal", "frequency"), [(True, True), (False, True)])
def test_dam_gradients_match_the_independent_reference(
    c: int, t: int, h: int, w: int, temporal: bool, frequency: bool
) -> None:
    """The gradients of every parameter and of the input equal the reference's (float64, all
    parameters randomised): the fused descriptors, batched matmuls and detached sign of the
    module must be the same function to first order too, not only in value."""
    torch.manual_seed(1)
    dam = DAM(c, t, temporal=temporal, frequency=frequency).double()
    with torch.no_grad():
        for q in dam.parameters():
            q.copy_(torch.randn_like(q) * 0.5)
    x = torch.randn(2, c, t, h, w, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, c, t, h, w, dtype=torch.float64)
    names = [name for name, _ in dam.named_parameters()]
    got = torch.autograd.grad((dam(x) * upstream).sum(), [x, *dam.parameters()])
    leaves = {name: q.detach().clone().requires_grad_(True) for name, q in dam.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)
    want = torch.autograd.grad(
        (_reference_dam(x_ref, leaves) * upstream).sum(), [x_ref, *leaves.values()]
    )
    for name, a, b in zip(["x", *names], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize(("h", "w"), [(7, 7), (5, 9), (12, 3), (1, 1)])
def test_fold_conv_equals_conv2d(h: int, w: int) -> None:
    """FreConv computed as one matmul and fold is the Conv2d(49 -> 1, 7x7, pad 3) it replaces."""
    torch.manual_seed(0)
    conv = nn.Conv2d(49, 1, 7, padding=3, bias=False).double()
    z = torch.randn(3, 49, h, w, dtype=torch.float64)
    got = conv_to_one_channel(z.flatten(2), conv.weight, (h, w))
    torch.testing.assert_close(got, conv(z), rtol=0, atol=1e-14)


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
    """A conv + DAM stack learns to imitate another one: every parameter moves and the loss falls.

    The gate is the only way DAM's own parameters affect the output, so a DAM that cut its gate
    from the graph (or a stack whose gradient stopped at DAM) would leave them where they started.
    """
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), DAM(8, 4))
    net = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), DAM(8, 4))
    x = torch.randn(4, 3, 4, 8, 8)
    with torch.no_grad():
        target = teacher(x)
    start = {name: q.detach().clone() for name, q in net.named_parameters()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = (net(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for name, q in net.named_parameters():
        assert not torch.equal(q.detach(), start[name]), name
    assert losses[-1] < 0.1 * losses[0]
