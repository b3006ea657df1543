"""DSM loss: a 3-sample batch computed by hand, balance weights, switches, degenerate batches."""

from __future__ import annotations

import math

import pytest
import torch

from hdf.losses.dsm import DSMLoss, ib_trace, weighted_supcon

# Three samples, two classes. Features chosen so the cosines are 0 or 1:
# f1 = (1, 0), f2 = (0, 1), f3 = (2, 0)  ->  s12 = 0, s13 = 1, s23 = 0.
FEATURES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
LABELS = torch.tensor([0, 1, 0])
LOGITS = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
TAU, ETA = 0.5, 0.25


def _supcon_by_hand() -> float:
    """Anchors 1 and 3 have one positive each (each other); anchor 2 has none and is skipped."""

    def w(s: float) -> float:
        return math.exp(-((s - ETA) ** 2) / (2 * ETA**2))

    # anchor 1: positive 3 (s = 1); denominator over a in {2 (s = 0), 3 (s = 1)}.
    denom = w(0.0) * math.exp(0.0 / TAU) + w(1.0) * math.exp(1.0 / TAU)
    l1 = -(1.0 / TAU - math.log(denom))
    # anchor 3 is the mirror image of anchor 1 (s31 = 1, s32 = 0).
    return (l1 + l1) / 2


def _ib_by_hand() -> float:
    """Tr(Cov) with the 1/N of the paper: mean = (1, 1/3); squared deviations 1/9, 13/9, 10/9."""
    return (1 / 9 + 13 / 9 + 10 / 9) / 3


def _ce_by_hand(eps: float) -> float:
    """Label-smoothed CE: target (1 - eps) on the label + eps / K on every class, K = 2."""
    total = 0.0
    for row, y in zip(LOGITS.tolist(), LABELS.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        logp = [v - log_z for v in row]
        total += -sum(((1 - eps) * (c == y) + eps / 2) * logp[c] for c in range(2))
    return total / 3


def test_supcon_matches_hand_computation() -> None:
    """Gaussian weights on cosine in the denominator over a != i; positives exclude the diagonal."""
    got = weighted_supcon(FEATURES, LABELS, TAU, ETA).item()
    assert got == pytest.approx(_supcon_by_hand(), rel=1e-5)


def test_ib_trace_matches_hand_computation() -> None:
    assert ib_trace(FEATURES).item() == pytest.approx(_ib_by_hand(), rel=1e-6)


def test_dsm_total_matches_hand_computation() -> None:
    """total = lambda_CE CE + lambda_SC (SC + ib_weight IB); g = 3: lambdas 3/4 alpha, beta/4."""
    alpha, beta, ib_w, eps = 2.0, 0.5, 0.1, 0.1
    loss_fn = DSMLoss(alpha=alpha, beta=beta, tau=TAU, eta=ETA, ib_weight=ib_w, label_smoothing=eps)
    loss, parts = loss_fn(LOGITS, FEATURES, LABELS, grad_norm=3.0)
    ce, sc, ib = _ce_by_hand(eps), _supcon_by_hand(), _ib_by_hand()
    expected = alpha * 3 / 4 * ce + beta / 4 * (sc + ib_w * ib)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert parts["supcon"] == pytest.approx(sc, rel=1e-5)
    assert parts["ib"] == pytest.approx(ib, rel=1e-5)
    assert parts["lambda_ce"] == pytest.approx(1.5)
    assert parts["lambda_sc"] == pytest.approx(0.125)
    assert parts["total"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("g", "lam_ce", "lam_sc"), [(0.0, 0.0, 0.5), (1.0, 0.5, 0.25), (9.0, 0.9, 0.05)]
)
def test_balance_weights(g: float, lam_ce: float, lam_sc: float) -> None:
    """lambda_CE = alpha g / (g + 1), lambda_SC = beta / (g + 1) (alpha = 1, beta = 0.5)."""
    assert DSMLoss(alpha=1.0, beta=0.5).weights(g) == pytest.approx((lam_ce, lam_sc))


def test_balance_uses_previous_g_when_none_is_given() -> None:
    """No g yet: g = 1; a call without g reuses the last one; balance off: constant weights."""
    loss_fn = DSMLoss(alpha=1.0, beta=0.5)
    assert loss_fn.weights() == pytest.approx((0.5, 0.25))
    loss_fn(LOGITS, FEATURES, LABELS, grad_norm=4.0)
    _, parts = loss_fn(LOGITS, FEATURES, LABELS)
    assert (parts["lambda_ce"], parts["lambda_sc"]) == pytest.approx((0.8, 0.1))
    loss_fn.observe_grad_norm(float("nan"))  # ignored
    assert loss_fn.weights() == pytest.approx((0.8, 0.1))
    assert DSMLoss(balance=False, alpha=2.0, beta=0.3).weights(5.0) == (2.0, 0.3)


def test_all_switches_off_is_label_smoothed_ce() -> None:
    """supcon, ib and balance off: exactly cross-entropy with label smoothing (alpha = 1)."""
    loss_fn = DSMLoss(supcon=False, ib=False, balance=False, alpha=1.0, label_smoothing=0.1)
    loss, parts = loss_fn(LOGITS, FEATURES, LABELS, grad_norm=2.0)
    assert loss.item() == pytest.approx(_ce_by_hand(0.1), rel=1e-6)
    assert parts["supcon"] == 0.0 and parts["ib"] == 0.0


@pytest.mark.parametrize(
    ("features", "labels"),
    [
        (torch.randn(4, 8), torch.tensor([2, 2, 2, 2])),  # one class
        (torch.randn(3, 8), torch.tensor([0, 0, 5])),  # a class seen once
        (torch.randn(3, 8), torch.tensor([0, 1, 2])),  # no positives at all
        (torch.ones(4, 8), torch.tensor([0, 0, 1, 1])),  # identical features
        (torch.zeros(4, 8), torch.tensor([0, 0, 1, 1])),  # all-zero features
        (torch.randn(1, 8), torch.tensor([3])),  # a single sample
    ],
)
def test_degenerate_batches_are_finite(features: torch.Tensor, labels: torch.Tensor) -> None:
    """Loss and gradients stay finite on batches SupCon usually divides by zero on."""
    features = features.clone().requires_grad_(True)
    logits = torch.randn(len(labels), 7, requires_grad=True)
    loss, parts = DSMLoss()(logits, features, labels, grad_norm=1.0)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(math.isfinite(v) for v in parts.values())
    assert torch.isfinite(features.grad).all() and torch.isfinite(logits.grad).all()


def test_ib_compresses() -> None:
    """DSM's IB term pulls features towards their mean: its gradient is +w 2 (z - zbar) / N.

    Only the IB term depends on the features here (supcon off; the logits are separate leaves),
    so d total / d z = beta * ib_weight * 2 (z_i - zbar) / N by hand, and a gradient step on the
    total shrinks Tr(Cov(Z)). The released code subtracts the term, which would flip both.
    """
    torch.manual_seed(0)
    z = torch.randn(6, 4, requires_grad=True)
    beta, ib_w = 0.5, 0.1
    loss_fn = DSMLoss(supcon=False, balance=False, alpha=1.0, beta=beta, ib_weight=ib_w)
    total, _ = loss_fn(torch.randn(6, 7), z, torch.tensor([0, 1, 2, 0, 1, 2]))
    total.backward()
    with torch.no_grad():
        by_hand = beta * ib_w * 2 * (z - z.mean(dim=0)) / 6
        torch.testing.assert_close(z.grad, by_hand)
        assert ib_trace(z - 10.0 * z.grad) < ib_trace(z)
