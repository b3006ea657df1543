"""DSM, the Distribution-aware Scaling Module: the HDF loss (docs/hdf_method.md).

total = lambda_CE * CE + lambda_SC * (L_D-SC + ib_weight * Tr(Cov(Z))), with
lambda_CE = alpha * g / (g + 1) and lambda_SC = beta / (g + 1), g the gradient norm.

Departures from the released `models/DSM.py` and trainer (docs/hdf_method.md §R4), all as the
paper's figure states them: the positive mask is defined (same label, diagonal removed); the
Gaussian weights act on cosine similarity and sit in the denominator over a != i; Tr(Cov(Z)) is
*added* (compression), not subtracted; the lambdas follow g instead of the fixed 10 / 0.1.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hdf.config.schema import DSMConfig


def weighted_supcon(
    features: torch.Tensor, labels: torch.Tensor, tau: float, eta: float
) -> torch.Tensor:
    """Distributionally robust supervised contrastive loss L_D-SC (§R4, the figure's panel (c)).

    L(i) = -1/|P(i)| sum_{p in P(i)} log[exp(s_ip / tau) / sum_{a != i} w_ia exp(s_ia / tau)],
    s the cosine similarity, w_ia = exp(-(s_ia - eta)^2 / (2 eta^2)), averaged over the anchors
    that have at least one positive (0 when none has; a class seen once adds no anchor).
    """
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    sim = z @ z.t()
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return sim.sum() * 0.0  # keeps the graph (and the device) with a zero value
    # The weights re-weight pairs and are not a path for the gradient (detached), as DRO
    # weights are; their log is added inside the log-sum-exp, so tiny weights cannot underflow.
    log_w = -((sim.detach() - eta) ** 2) / (2.0 * eta**2)
    logits = (sim / tau + log_w).masked_fill(eye, float("-inf"))
    log_denom = torch.logsumexp(logits, dim=1)  # log sum_{a != i} w_ia exp(s_ia / tau)
    log_prob = sim / tau - log_denom[:, None]
    per_anchor = -(log_prob * pos).sum(dim=1) / n_pos.clamp(min=1)
    return per_anchor[has_pos].mean()


def ib_trace(features: torch.Tensor) -> torch.Tensor:
    """Information-bottleneck term Tr(Cov(Z)) = mean_i ||z_i - zbar||^2 (§R4)."""
    z = features.float()
    return (z - z.mean(dim=0, keepdim=True)).square().sum(dim=1).mean()


class DSMLoss(nn.Module):
    """CE with label smoothing + lambda-balanced D-SC and IB terms (§R4, the figure's panel (c)).

    Each term can be switched off (``supcon``, ``ib``, ``balance``); with all three off the loss
    is ``alpha`` * cross-entropy with label smoothing (alpha = 1 gives the plain baseline).
    With ``balance`` off the weights are the constants lambda_CE = alpha, lambda_SC = beta (the
    released trainer's fixed-weight form, whose 10 / 0.1 are the g -> inf / g -> 0 limits).

    g: when ``forward`` gets ``grad_norm`` (SAM's first pass measured it on this batch) it is
    used and remembered; when it gets None (SAM's first pass itself, or SAM off) the last
    remembered g is used, i.e. the previous step's. Before any g is known, g = 1 (lambda_CE =
    alpha / 2, lambda_SC = beta / 2). With SAM off the loop reports g through
    ``observe_grad_norm`` after each backward pass, so it costs no extra pass either way.
    """

    def __init__(self, settings: DSMConfig | None = None, **changes: Any) -> None:
        """`settings` (the run's ``dsm`` section; default: the schema's defaults, i.e. the
        default run's loss), with any field replaced by a keyword of the same name."""
        super().__init__()
        s = replace(settings or DSMConfig(), **changes)
        if s.tau <= 0 or s.eta <= 0:
            raise ValueError(f"dsm.tau and dsm.eta must be > 0, got tau={s.tau} eta={s.eta}")
        if not 0.0 <= s.label_smoothing < 1.0:
            raise ValueError(f"dsm.label_smoothing must be in [0, 1), got {s.label_smoothing}")
        self.supcon = bool(s.supcon)
        self.ib = bool(s.ib)
        self.balance = bool(s.balance)
        self.alpha = float(s.alpha)
        self.beta = float(s.beta)
        self.tau = float(s.tau)
        self.eta = float(s.eta)
        self.ib_weight = float(s.ib_weight)
        self.label_smoothing = float(s.label_smoothing)
        self.last_grad_norm: float | None = None

    def observe_grad_norm(self, grad_norm: float) -> None:
        """Remember g for the next step (ignored when not finite)."""
        if math.isfinite(grad_norm):
            self.last_grad_norm = float(grad_norm)

    def weights(self, grad_norm: float | None = None) -> tuple[float, float]:
        """(lambda_CE, lambda_SC) for gradient norm g (§R4, gradient-driven scaling)."""
        if not self.balance:
            return self.alpha, self.beta
        g = grad_norm if grad_norm is not None else self.last_grad_norm
        g = 1.0 if g is None or not math.isfinite(g) else max(float(g), 0.0)
        return self.alpha * g / (g + 1.0), self.beta / (g + 1.0)

    def forward(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        grad_norm: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(total loss, parts: ce, supcon, ib, lambda_ce, lambda_sc, total) for one batch."""
        if grad_norm is not None:
            self.observe_grad_norm(grad_norm)
        lam_ce, lam_sc = self.weights(grad_norm)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        zero = ce.new_zeros(())
        sc = weighted_supcon(features, labels, self.tau, self.eta) if self.supcon else zero
        ib = ib_trace(features) if self.ib else zero
        total = lam_ce * ce
        if self.supcon or self.ib:
            total = total + lam_sc * (sc + self.ib_weight * ib)
        values = torch.stack([ce, sc, ib, total]).detach().tolist()  # one device sync
        parts = dict(zip(("ce", "supcon", "ib", "total"), values, strict=True))
        parts.update(lambda_ce=lam_ce, lambda_sc=lam_sc)
        return total, parts
