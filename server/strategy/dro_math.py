"""The maths of the DRO weighting over sources, as pure functions on numpy arrays.

lambda is a point of the capped simplex {lambda_k >= 0, sum lambda = 1, lambda_k <= cap}; every
function takes and returns arrays aligned with the strategy's ordered list of training sources.
No Flower import: these are tested by hand computation (tests/test_dro_math.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DROSettings:
    """Settings common to every mode (DESIGN.md section 4)."""

    eta: float = 1.0  # step size of the exponentiated-gradient / ascent update
    eps: float = 0.1  # mixing toward the prior after each update
    cap: float = 0.5  # no source weighs more than this
    loss_clip: float = 10.0  # reported losses are clipped to [0, loss_clip]
    tau: float = 1.0  # KL-ball temperature
    alpha: float = 0.5  # CVaR: share of sources counted as the worst


def project_capped_simplex(w: np.ndarray, cap: float) -> np.ndarray:
    """Nearest point in KL divergence of the capped simplex to positive weights `w`.

    Weights above the cap are set to it and the rest rescaled to take up the remaining mass,
    repeated until nothing exceeds the cap (at most K passes).
    """
    w = np.asarray(w, dtype=np.float64)
    k = len(w)
    if k == 0:
        return w
    if cap * k < 1.0 - 1e-12:
        raise ValueError(f"cap {cap} is below 1/K = {1.0 / k:.4f}: no weighting can satisfy it")
    w = np.clip(w, 0.0, None)
    if w.sum() <= 0:
        w = np.ones(k)
    w = w / w.sum()
    capped = np.zeros(k, dtype=bool)
    for _ in range(k):
        free = ~capped
        rest = 1.0 - cap * capped.sum()
        mass = w[free].sum()
        out = np.where(capped, cap, w * (rest / mass if mass > 0 else 0.0))
        if mass <= 0:  # every uncapped weight is zero: share the rest evenly
            out[free] = rest / free.sum()
        over = (out > cap + 1e-12) & free
        if not over.any():
            return out
        capped |= over
    return np.minimum(out, cap)


def mix_prior(lam: np.ndarray, prior: np.ndarray, eps: float) -> np.ndarray:
    """lambda <- (1 - eps) * lambda + eps * prior: keeps every source in play."""
    return (1.0 - eps) * lam + eps * prior


def clip_losses(losses: np.ndarray, bound: float) -> np.ndarray:
    """Reported losses clipped to [0, bound], so one extreme report cannot blow lambda up."""
    return np.clip(losses, 0.0, bound)


def eg_step(lam: np.ndarray, losses: np.ndarray, mask: np.ndarray, s: DROSettings) -> np.ndarray:
    """Exponentiated gradient (Group DRO): lambda_k <- lambda_k * exp(eta * loss_k), normalised.

    Only sources that reported this round (`mask`) move; the others keep their relative weight.
    """
    logits = np.log(np.maximum(lam, 1e-300)) + s.eta * np.where(mask, losses, 0.0)
    w = np.exp(logits - logits.max())
    return w / w.sum()


DROStep = Callable[[np.ndarray, np.ndarray, np.ndarray, DROSettings], np.ndarray]

DRO_MODES: dict[str, DROStep] = {"eg": eg_step}


def update_lambda(
    mode: str,
    lam: np.ndarray,
    losses: np.ndarray,
    mask: np.ndarray,
    prior: np.ndarray,
    s: DROSettings,
) -> np.ndarray:
    """One DRO update: mode step on clipped losses, prior mixing, then the capped projection."""
    if mode not in DRO_MODES:
        raise ValueError(f"unknown DRO mode {mode!r}; known modes: {sorted(DRO_MODES)}")
    step = DRO_MODES[mode](lam, clip_losses(losses, s.loss_clip), mask, s)
    return project_capped_simplex(mix_prior(step, prior, s.eps), s.cap)
