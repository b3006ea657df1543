"""q-FFL's maths (Li et al., ICLR 2020) as a pure function, tested by hand
(tests/test_qffl_math.py).

Used by `server.strategy.qfedavg`; no Flower import.
"""

from __future__ import annotations

import numpy as np


def qffl_weights(losses: np.ndarray, q: float) -> np.ndarray:
    """q-FFL's effective relative weight of each client in the numerator: F_k^q, normalised."""
    w = np.float_power(np.asarray(losses, np.float64) + 1e-10, q)
    return w / w.sum()
