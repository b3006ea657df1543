"""The lambda maths against hand computations (3 sources, 2 rounds)."""

import numpy as np
import pytest

from server.strategy.dro_math import (
    DROSettings,
    eg_step,
    project_capped_simplex,
    update_lambda,
)

UNIFORM = np.full(3, 1 / 3)
ALL = np.ones(3, dtype=bool)


def test_eg_two_rounds_by_hand() -> None:
    """eta=1, eps=0.1, cap=0.5, losses (1, 2, 3) then (3, 1, 1).

    Round 1: exp(1,2,3)/sum = (.090031, .244728, .665241); mixed with the prior:
    (.114361, .253589, .632050); the third is capped at .5 and the other two share .5 in
    proportion: (.155403, .344597, .5).
    Round 2: lam * exp(3,1,1) normalised = (.576193, .172914, .250894); mixed:
    (.551906, .188956, .259138); the first is capped: (.5, .210845, .289155).
    """
    s = DROSettings(eta=1.0, eps=0.1, cap=0.5, loss_clip=10.0)
    lam = update_lambda("eg", UNIFORM, np.array([1.0, 2.0, 3.0]), ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.155403, 0.344597, 0.5], atol=2e-6)
    lam = update_lambda("eg", lam, np.array([3.0, 1.0, 1.0]), ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.5, 0.210845, 0.289155], atol=2e-6)


def test_absent_source_keeps_its_relative_weight() -> None:
    """Only sources that reported move: with source 1 silent, the ratio lam0/lam1 grows by
    exp(eta * loss0) and lam2/lam1 by exp(eta * loss2)."""
    s = DROSettings(eta=0.5)
    lam = np.array([0.2, 0.3, 0.5])
    out = eg_step(lam, np.array([2.0, 99.0, 1.0]), np.array([True, False, True]), s)
    assert out[0] / out[1] == pytest.approx(0.2 / 0.3 * np.exp(1.0))
    assert out[2] / out[1] == pytest.approx(0.5 / 0.3 * np.exp(0.5))
    assert out.sum() == pytest.approx(1.0)


def test_cap_holds_when_one_source_reports_100x() -> None:
    s = DROSettings(eta=1.0, eps=0.0, cap=0.4, loss_clip=10.0)
    lam = UNIFORM.copy()
    for _ in range(20):
        lam = update_lambda("eg", lam, np.array([1.0, 1.0, 100.0]), ALL, UNIFORM, s)
    assert lam.max() <= 0.4 + 1e-12
    assert lam.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(lam, [0.3, 0.3, 0.4], atol=1e-9)


def test_projection_keeps_feasible_points_and_rejects_impossible_caps() -> None:
    w = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(project_capped_simplex(w, 0.5), w)
    np.testing.assert_allclose(project_capped_simplex(np.array([8.0, 1.0, 1.0]), 0.6), [0.6, 0.2, 0.2])
    with pytest.raises(ValueError, match="below 1/K"):
        project_capped_simplex(w, 0.3)


def test_unknown_mode_is_named() -> None:
    with pytest.raises(ValueError, match="unknown DRO mode 'nope'"):
        update_lambda("nope", UNIFORM, UNIFORM, ALL, UNIFORM, DROSettings())
