"""FedDG-GA's generalization adjustment against hand computations."""

import numpy as np
import pytest

from server.strategy.feddg_ga_math import feddg_ga_step, linear_decay

UNIFORM = np.full(3, 1 / 3)
ALL = np.ones(3, dtype=bool)


def test_feddg_ga_step_by_hand() -> None:
    """Weights (1/3 each), gaps (0.1, 0.4, 0.1), d = 0.2: mean .2, centred (-.1, .2, -.1),
    divided by the largest |.2|: (-.5, 1, -.5); times d: (-.1, .2, -.1); a = (.233333,
    .533333, .233333), sum 1: unchanged by normalisation."""
    out = feddg_ga_step(UNIFORM, np.array([0.1, 0.4, 0.1]), ALL, 0.2)
    np.testing.assert_allclose(out, [0.7 / 3, 1.6 / 3, 0.7 / 3], atol=1e-12)
    # Source 2 has no gap: centred over the two that reported, (-.15, .15) / .15 * .2 =
    # (-.2, .2), so a = (.133333, .533333) and source 2 keeps 1/3; the sum is 1 already.
    part = feddg_ga_step(UNIFORM, np.array([0.1, 0.4, 0.0]), np.array([True, True, False]), 0.2)
    np.testing.assert_allclose(part, [0.4 / 3, 1.6 / 3, 1 / 3], atol=1e-12)
    assert linear_decay(0.2, 1, 10) == pytest.approx(0.2)
    assert linear_decay(0.2, 6, 10) == pytest.approx(0.1)
