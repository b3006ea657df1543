"""SAM: two passes, perturbation size, exact restore before the base step, rho = 0, schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from hdf.optim import SAM, cosine_with_warmup


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_first_step_returns_grad_norm_and_perturbs_by_rho() -> None:
    """first_step returns ||grad|| and moves the weights by exactly rho * grad / ||grad||."""
    model = _model()
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    model(torch.randn(5, 3)).square().sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    g = sam.first_step()
    expected_g = math.sqrt(sum(float(gr.square().sum()) for gr in grads))
    assert g == pytest.approx(expected_g, rel=1e-6)
    moved = math.sqrt(
        sum(
            float((p.detach() - b).square().sum())
            for p, b in zip(model.parameters(), before, strict=True)
        )
    )
    assert moved == pytest.approx(0.05, rel=1e-4)


def test_first_step_moves_along_the_gradient_uphill() -> None:
    """The perturbation is +rho * grad / ||grad|| element by element (ascent, not descent).

    SAM evaluates the second gradient at the worst nearby weights, so e points along the gradient
    and the loss at w + e is higher than at w; a flipped sign would make SAM a plain lookahead.
    """
    model = _model()
    x = torch.randn(5, 3)
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    loss_before = model(x).square().sum()
    loss_before.backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    g = sam.first_step()
    for p, b, gr in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach() - b, 0.05 * gr / g, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        assert model(x).square().sum() > loss_before


def test_two_passes_restore_weights_exactly_then_step() -> None:
    """The weights are restored bit-exactly, then stepped with the second-pass gradients."""
    model = _model()
    x = torch.randn(8, 3)
    w0 = [p.detach().clone() for p in model.parameters()]
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.5), rho=0.1)
    model(x).square().sum().backward()
    grads1 = [p.grad.clone() for p in model.parameters()]
    sam.first_step()
    sam.zero_grad()
    model(x).square().sum().backward()  # second pass, at the perturbed weights
    grads2 = [p.grad.clone() for p in model.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(grads1, grads2, strict=True))
    sam.restore()
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p, w)
    sam.second_step()  # restore again is a no-op; the base step uses the second-pass gradients
    for p, w, g2 in zip(model.parameters(), w0, grads2, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.5 * g2)


def test_second_step_with_zero_lr_leaves_original_weights() -> None:
    model = _model()
    w0 = [p.detach().clone() for p in model.parameters()]
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.0), rho=0.5)
    model(torch.randn(4, 3)).sum().backward()
    sam.first_step()
    sam.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    sam.second_step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0, strict=True))


def test_rho_zero_does_not_perturb() -> None:
    model = _model()
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.0)
    model(torch.randn(4, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    g = sam.first_step()
    assert g > 0 and not sam.two_pass
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=-1.0)


def test_cosine_with_warmup_shape() -> None:
    """Linear warm-up to lr, cosine down to min_lr_ratio * lr at the last step."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.55)  # half-way through the cosine
    assert lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))


def _reference_sam_steps(
    model: nn.Module, batches: list[torch.Tensor], rho: float, lr: float
) -> tuple[list[torch.Tensor], list[float]]:
    """SAM + SGD written out per tensor: w' = w - lr grad(w + rho g_1 / |g_1|)."""
    params = list(model.parameters())
    norms = []
    for x in batches:
        grads = torch.autograd.grad(model(x).square().sum(), params)
        g = math.sqrt(sum(float(gr.double().square().sum()) for gr in grads))
        norms.append(g)
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gr in zip(params, grads, strict=True):
                p += rho / g * gr
        grads2 = torch.autograd.grad(model(x).square().sum(), params)
        with torch.no_grad():
            for p, w0, gr in zip(params, w, grads2, strict=True):
                p.copy_(w0 - lr * gr)
    return [p.detach().clone() for p in params], norms


def test_step_equals_a_hand_written_sam_and_hands_g_to_the_second_pass() -> None:
    """SAM.step over three batches (its weight buffers reused) equals the reference update, and
    the second-pass loss is called once per step with that step's first-pass g."""
    batches = [torch.randn(6, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reference = _model()
    expected, expected_g = _reference_sam_steps(reference, batches, rho=0.2, lr=0.1)
    model = _model()
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2)
    seen: list[float] = []

    def perturbed(x: torch.Tensor, g: float) -> torch.Tensor:
        seen.append(g)
        return model(x).square().sum()

    got = [sam.step(model(x).square().sum(), lambda g, x=x: perturbed(x, g)) for x in batches]
    assert got == pytest.approx(expected_g, rel=1e-6) and seen == got
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_step_with_rho_zero_is_one_plain_step() -> None:
    """rho = 0: no second pass; the base optimizer steps with the first gradient."""
    model = _model()
    x = torch.randn(4, 3)
    w0 = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.5), rho=0.0)
    sam.step(model(x).sum(), lambda g: pytest.fail("no second pass expected"))
    for p, w, gr in zip(model.parameters(), w0, grads, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.5 * gr)


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_a_non_finite_gradient_skips_the_step_and_is_counted(rho: float) -> None:
    """A NaN in the gradient the base step would use leaves the weights and the optimiser
    state as they were (AdamW would spread it into every weight); the next finite step runs."""
    model = _model()
    x = torch.randn(8, 3)
    w0 = [p.detach().clone() for p in model.parameters()]
    base = torch.optim.AdamW(model.parameters(), lr=0.1)
    sam = SAM(model.parameters(), base, rho=rho)

    def nan_loss(_g: float) -> torch.Tensor:
        return model(x).square().sum() * float("nan")

    loss = model(x).square().sum() * (float("nan") if rho == 0 else 1.0)
    sam.step(loss, nan_loss)
    assert sam.skipped == 1 and not base.state
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0, strict=True))
    sam.step(model(x).square().sum(), lambda _g: model(x).square().sum())
    assert sam.skipped == 1 and base.state
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), w0, strict=True))
