"""FedDG-GA's maths (Zhang et al., CVPR 2023) as pure functions, tested by hand
(tests/test_feddg_ga_math.py).

Used by `server.strategy.feddg_ga`; no Flower import.
"""

from __future__ import annotations

import numpy as np


def feddg_ga_step(
    weights: np.ndarray,
    gaps: np.ndarray,
    mask: np.ndarray,
    step: float,
    signal: float = 1.0,
) -> np.ndarray:
    """FedDG-GA generalization adjustment (Zhang et al. 2023, paper form as in FL4Health).

    G~_k = step * (G_k - mean G) / max_j |G_j - mean G| over the sources that reported
    (`mask`); a_k <- clip(a_k + signal * G~_k, 0, 1) (signal +1 for a loss gap, -1 for an
    accuracy gap); a <- a / sum a. A source whose gap is larger than the others' gains weight.
    Sources without a gap this round keep their weight before renormalisation.
    """
    a = np.asarray(weights, dtype=np.float64).copy()
    mask = np.asarray(mask, dtype=bool)
    if mask.sum() >= 1:
        g = np.asarray(gaps, dtype=np.float64)[mask]
        centred = g - g.mean()
        top = np.abs(centred).max()
        if top > 0:
            a[mask] = np.clip(a[mask] + signal * step * centred / top, 0.0, 1.0)
    if a.sum() <= 0:
        a = np.ones_like(a)
    return a / a.sum()


def linear_decay(step: float, server_round: int, num_rounds: int) -> float:
    """d^r = d * (1 - r / R): FedDG-GA's step size shrinks linearly to 0 at the last round."""
    if num_rounds <= 0:
        return step
    return step * max(0.0, 1.0 - (server_round - 1) / num_rounds)
