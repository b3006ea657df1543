"""q-FFL's client weights against hand computations."""

import numpy as np

from server.strategy.qffl_math import qffl_weights


def test_qffl_weights_by_hand() -> None:
    """q=1: weights proportional to the losses (1, 3) -> (.25, .75); q=0: equal."""
    np.testing.assert_allclose(qffl_weights(np.array([1.0, 3.0]), 1.0), [0.25, 0.75])
    np.testing.assert_allclose(qffl_weights(np.array([1.0, 3.0]), 0.0), [0.5, 0.5])
