"""The lambda maths against hand computations (3 sources, 2 rounds), for every DRO mode."""

import numpy as np
import pytest

from hdf.seeding import round_seed
from server.strategy.dro_math import (
    DRO_MODES,
    DROSettings,
    afl_step,
    ema,
    excess_loss,
    fill_losses,
    limit_step,
    on_capped_simplex,
    project_capped_simplex,
    project_capped_simplex_euclid,
    sample_by_weight,
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
    s = DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=0.5, loss_clip=10.0)
    lam = update_lambda("eg", UNIFORM, np.array([1.0, 2.0, 3.0]), ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.155403, 0.344597, 0.5], atol=2e-6)
    lam = update_lambda("eg", lam, np.array([3.0, 1.0, 1.0]), ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.5, 0.210845, 0.289155], atol=2e-6)


def test_absent_source_keeps_its_weight() -> None:
    """Source 1 is silent: it keeps 0.3; sources 0 and 2 share the other 0.7 in the EG
    proportions 0.2 e^(0.5*2) : 0.5 e^(0.5*1) = 0.543656 : 0.824361, i.e. 0.7 * (0.397404, 0.602596)
    = (0.278183, 0.421817)."""
    s = DROSettings(max_step=1.0, eta=0.5, eps=0.0, cap=1.0)
    lam = np.array([0.2, 0.3, 0.5])
    out = update_lambda(
        "eg", lam, np.array([2.0, 99.0, 1.0]), np.array([True, False, True]), lam, s
    )
    np.testing.assert_allclose(out, [0.278183, 0.3, 0.421817], atol=1e-6)


def test_kl_two_rounds_by_hand_with_a_silent_source() -> None:
    """tau=1, eps=0.1, cap=0.5, uniform prior.

    Round 1, losses (1, 2, 3): p * exp(L / tau) normalised is exp(1,2,3)/sum, the same as the
    eg example's first step, so lambda = (.155403, .344597, .5).
    Round 2, sources 0 and 1 report (3, 1), source 2 is silent and its last loss 3 is used:
    exp(3, 1, 3) = (20.0855, 2.71828, 20.0855), sum 42.8894 -> (.468311, .063379, .468311);
    mixed: .9 * x + .033333 = (.454813, .090374, .454813); nothing over the cap.
    With tau = 2 instead: exp(1.5, .5, 1.5) = (4.48169, 1.64872, 4.48169), sum 10.6121 ->
    (.422319, .155362, .422319); mixed: (.413420, .173159, .413420).
    """
    s = DROSettings(max_step=1.0, eps=0.1, cap=0.5, tau=1.0)
    lam = update_lambda("kl", UNIFORM, np.array([1.0, 2.0, 3.0]), ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.155403, 0.344597, 0.5], atol=2e-6)
    memory = np.array([1.0, 2.0, 3.0])
    silent = np.array([True, True, False])
    out = update_lambda("kl", lam, np.array([3.0, 1.0, 0.0]), silent, UNIFORM, s, memory)
    np.testing.assert_allclose(out, [0.454813, 0.090374, 0.454813], atol=2e-6)
    s2 = DROSettings(max_step=1.0, eps=0.1, cap=0.5, tau=2.0)
    out = update_lambda("kl", lam, np.array([3.0, 1.0, 0.0]), silent, UNIFORM, s2, memory)
    np.testing.assert_allclose(out, [0.413420, 0.173159, 0.413420], atol=2e-6)


def test_kl_is_closed_form_of_losses_not_of_lambda() -> None:
    s = DROSettings(max_step=1.0, eps=0.0, cap=1.0, tau=0.5)
    losses = np.array([0.5, 1.0, 2.0])
    a = update_lambda("kl", np.array([0.9, 0.05, 0.05]), losses, ALL, UNIFORM, s)
    b = update_lambda("kl", UNIFORM, losses, ALL, UNIFORM, s)
    np.testing.assert_allclose(a, b)


def test_cvar_two_rounds_by_hand() -> None:
    """alpha=0.5, K=3, uniform prior: each source takes at most p/alpha = 2/3.

    Round 1, losses (1, 3, 2): source 1 (worst) takes 2/3, source 2 the remaining 1/3,
    source 0 nothing; mixed with eps=0.1: (.033333, .633333, .333333) (cap 1: unchanged).
    Round 2, source 1 silent with last loss 3, reports (4, -, 1): order 0 (4), 1 (3), 2 (1):
    (2/3, 1/3, 0) -> mixed (.633333, .333333, .033333).
    With cap .5 the round-1 point becomes (.5 on source 1, the other .5 split 1:10 between
    sources 0 and 2): (.045455, .5, .454545).
    """
    s = DROSettings(max_step=1.0, eps=0.1, cap=1.0, alpha=0.5)
    lam = update_lambda("cvar", UNIFORM, np.array([1.0, 3.0, 2.0]), ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [1 / 30, 19 / 30, 1 / 3], atol=1e-9)
    mask = np.array([True, False, True])
    memory = np.array([1.0, 3.0, 2.0])
    lam = update_lambda("cvar", lam, np.array([4.0, 0.0, 1.0]), mask, UNIFORM, s, memory)
    np.testing.assert_allclose(lam, [19 / 30, 1 / 3, 1 / 30], atol=1e-9)
    capped = DROSettings(max_step=1.0, eps=0.1, cap=0.5, alpha=0.5)
    lam = update_lambda("cvar", UNIFORM, np.array([1.0, 3.0, 2.0]), ALL, UNIFORM, capped)
    np.testing.assert_allclose(lam, [0.5 / 11, 0.5, 5 / 11], atol=1e-9)


def test_cvar_fractional_boundary() -> None:
    """alpha=0.4, K=3: ceil(1.2) = 2 sources; the worst takes (1/3)/0.4 = 5/6, the next the
    remaining 1/6 (fractional), the best nothing (eps=0)."""
    s = DROSettings(max_step=1.0, eps=0.0, cap=1.0, alpha=0.4)
    lam = update_lambda("cvar", UNIFORM, np.array([1.0, 3.0, 2.0]), ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.0, 5 / 6, 1 / 6], atol=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        update_lambda(
            "cvar", UNIFORM, UNIFORM, ALL, UNIFORM, DROSettings(max_step=1.0, alpha=0.0, cap=1.0)
        )


def test_afl_two_rounds_by_hand() -> None:
    """eta=0.1, eps=0.1, cap=0.5.

    Round 1, losses (1, 2, 3): v = 1/3 + (.1, .2, .3) = (.433333, .533333, .633333), sum 1.6;
    the projection subtracts theta = .2 from each (all stay in [0, .5]): (.233333, .333333,
    .433333); mixed: (.243333, .333333, .423333).
    Round 2, losses (3, 1, 1): v = (.543333, .433333, .523333), sum 1.5, theta = 1/6:
    (.376667, .266667, .356667); mixed: (.372333, .273333, .354333).
    """
    s = DROSettings(max_step=1.0, eta=0.1, eps=0.1, cap=0.5)
    lam = update_lambda("afl", UNIFORM, np.array([1.0, 2.0, 3.0]), ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.243333, 0.333333, 0.423333], atol=1e-6)
    lam = update_lambda("afl", lam, np.array([3.0, 1.0, 1.0]), ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.372333, 0.273333, 0.354333], atol=1e-6)


def test_afl_silent_source_gets_no_gradient() -> None:
    """eta=.1, eps=0, cap=1, source 1 silent (its 9 is ignored): v = 1/3 + (.1, 0, .3) =
    (.433333, .333333, .633333), sum 1.4, theta = .133333: (.3, .2, .5)."""
    s = DROSettings(max_step=1.0, eta=0.1, eps=0.0, cap=1.0)
    out = afl_step(UNIFORM, np.array([1.0, 9.0, 3.0]), np.array([True, False, True]), UNIFORM, s)
    np.testing.assert_allclose(out, [0.3, 0.2, 0.5], atol=1e-12)


def test_drfa_uses_afl_ascent() -> None:
    s = DROSettings(max_step=1.0, eta=0.1, eps=0.1, cap=0.5)
    losses = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(
        update_lambda("drfa", UNIFORM, losses, ALL, UNIFORM, s),
        update_lambda("afl", UNIFORM, losses, ALL, UNIFORM, s),
    )
    assert DRO_MODES["drfa"].sample_by_lambda and not DRO_MODES["afl"].sample_by_lambda


@pytest.mark.parametrize("mode", sorted(DRO_MODES))
def test_cap_holds_when_one_source_reports_100x(mode: str) -> None:
    """Source 2 reports 100x the others' loss (clipped to 10) for 20 rounds: lambda stays on
    the capped simplex in every mode and the liar ends exactly at the cap .4. The others share
    the rest equally, except in CVaR: its worst half is source 2 (2/3) and source 0 (1/3, first
    of the tie by index); capping source 2 at .4 sends .6 to source 0, over the cap too, so it
    is capped and source 1 takes the last .2: (.4, .2, .4)."""
    s = DROSettings(max_step=1.0, eta=1.0, eps=0.0, cap=0.4, loss_clip=10.0, tau=1.0, alpha=0.5)
    lam = UNIFORM.copy()
    for _ in range(20):
        lam = update_lambda(mode, lam, np.array([1.0, 1.0, 100.0]), ALL, UNIFORM, s)
        assert lam.max() <= 0.4 + 1e-12
        assert lam.min() >= -1e-12
        assert lam.sum() == pytest.approx(1.0)
    expected = [0.4, 0.2, 0.4] if mode == "cvar" else [0.3, 0.3, 0.4]
    np.testing.assert_allclose(lam, expected, atol=1e-9)


def test_limit_step_by_hand() -> None:
    """From uniform over 5 toward (.5, .125 x4): the largest move .3 exceeds .1, so a third of
    the step is taken: (.3, .175 x4), still summing to 1. A small step is taken whole."""
    old = np.full(5, 0.2)
    new = np.array([0.5, 0.125, 0.125, 0.125, 0.125])
    np.testing.assert_allclose(limit_step(old, new, 0.1), [0.3, 0.175, 0.175, 0.175, 0.175])
    np.testing.assert_allclose(limit_step(old, new, 0.3), new)
    with pytest.raises(ValueError, match="max_step must be > 0"):
        limit_step(old, new, 0.0)


@pytest.mark.parametrize("mode", sorted(DRO_MODES))
def test_a_liar_moves_lambda_at_most_max_step_per_round(mode: str) -> None:
    """The 100x liar above with max_step .05. eg, round 1 by hand: the unbounded update is
    (.3, .3, .4) (source 2 capped); the move (-1/30, -1/30, 1/15) is shortened by .05 / (1/15)
    = .75: (.308333, .308333, .383333). In every mode no weight moves more than .05 a round."""
    s = DROSettings(eta=1.0, eps=0.0, cap=0.4, tau=1.0, alpha=0.5, max_step=0.05)
    lam = UNIFORM.copy()
    for r in range(20):
        new = update_lambda(mode, lam, np.array([1.0, 1.0, 100.0]), ALL, UNIFORM, s)
        assert np.abs(new - lam).max() <= 0.05 + 1e-12
        assert on_capped_simplex(new, 0.4)
        if mode == "eg" and r == 0:
            np.testing.assert_allclose(new, [0.308333, 0.308333, 0.383333], atol=1e-6)
        lam = new


def test_negative_or_infinite_losses_are_refused_not_clipped() -> None:
    s = DROSettings(max_step=1.0)
    for bad in (-0.5, np.inf):
        with pytest.raises(ValueError, match="losses must be finite and >= 0"):
            update_lambda("eg", UNIFORM, np.array([1.0, bad, 1.0]), ALL, UNIFORM, s)


def test_on_capped_simplex() -> None:
    assert on_capped_simplex(np.array([0.2, 0.3, 0.5]), 0.5)
    assert not on_capped_simplex(np.array([0.2, 0.2, 0.6]), 0.5)
    assert not on_capped_simplex(np.array([np.nan, 0.5, 0.5]), 0.5)
    assert not on_capped_simplex(np.array([0.2, 0.3, 0.4]), 0.5)


def test_projection_keeps_feasible_points_and_rejects_impossible_caps() -> None:
    w = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(project_capped_simplex(w, 0.5), w)
    np.testing.assert_allclose(
        project_capped_simplex(np.array([8.0, 1.0, 1.0]), 0.6), [0.6, 0.2, 0.2]
    )
    with pytest.raises(ValueError, match="below 1/K"):
        project_capped_simplex(w, 0.3)
    with pytest.raises(ValueError, match="below 1/K"):
        project_capped_simplex_euclid(w, 0.3)


@pytest.mark.parametrize(
    ("v", "cap", "expected"),
    [
        ([0.2, 0.3, 0.5], 1.0, [0.2, 0.3, 0.5]),  # already feasible
        ([2.0, 0.0, 0.0], 1.0, [1.0, 0.0, 0.0]),  # plain simplex corner
        ([2.0, 0.0, 0.0], 0.5, [0.5, 0.25, 0.25]),  # cap binds, the rest share equally
        ([1.0, 0.0, 0.0], 1 / 3, [1 / 3, 1 / 3, 1 / 3]),  # cap = 1/K forces uniform
        ([-1.0, 0.5, 0.9], 1.0, [0.0, 0.3, 0.7]),  # theta = .2, the negative clips to 0
    ],
)
def test_euclidean_projection_by_hand(v, cap, expected) -> None:
    np.testing.assert_allclose(
        project_capped_simplex_euclid(np.array(v), cap), expected, atol=1e-12
    )


def test_euclidean_projection_is_the_nearest_point() -> None:
    """Against random feasible points: none is closer to v than the projection."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.normal(size=4)
        x = project_capped_simplex_euclid(v, 0.4)
        assert x.max() <= 0.4 + 1e-12 and x.sum() == pytest.approx(1.0)
        for _ in range(20):
            y = project_capped_simplex_euclid(rng.normal(size=4) * 3, 0.4)
            assert np.sum((x - v) ** 2) <= np.sum((y - v) ** 2) + 1e-12


def test_fill_losses_uses_memory_then_the_mean() -> None:
    out = fill_losses(
        np.array([2.0, 0.0, 0.0]), np.array([True, False, False]), np.array([9.0, 4.0, np.nan])
    )
    np.testing.assert_allclose(out, [2.0, 4.0, 3.0])


def test_sampling_is_proportional_to_lambda() -> None:
    """3 draws a round from lambda = (.2, .3, .5) over 3000 seeded rounds: a chi-square test
    against 9000 * lambda (2 degrees of freedom; 13.8 is the 0.1% critical value)."""
    lam = np.array([0.2, 0.3, 0.5])
    counts = sum(sample_by_weight(lam, 3, round_seed(0, r)) for r in range(1, 3001))
    expected = 9000 * lam
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts, chi2)
    # the same round samples the same way (a resumed run repeats the original's draws)
    np.testing.assert_array_equal(
        sample_by_weight(lam, 3, round_seed(4, 7)), sample_by_weight(lam, 3, round_seed(4, 7))
    )


def test_nothing_reported_moves_nothing() -> None:
    lam = np.array([0.2, 0.3, 0.5])
    out = update_lambda(
        "eg", lam, np.zeros(3), np.zeros(3, bool), UNIFORM, DROSettings(max_step=1.0)
    )
    np.testing.assert_allclose(out, lam)


def test_unknown_mode_is_named() -> None:
    with pytest.raises(ValueError, match="unknown DRO mode 'nope'"):
        update_lambda("nope", UNIFORM, UNIFORM, ALL, UNIFORM, DROSettings(max_step=1.0))


# ---- regret: lambda on the excess loss over each source's own model ---------------------------
def test_regret_two_rounds_by_hand() -> None:
    """eta=1, eps=0.1, cap=0.5, uniform prior.

    Round 1: global-model validation losses (1, 2, 1.5), local models' (0.5, 1.9, 1.5): excess
    (0.5, 0.1, 0). exp(.5, .1, 0) = (1.648721, 1.105171, 1), sum 3.753892 -> (.439203, .294407,
    .266390); mixed .9 x + .033333 = (.428616, .298299, .273084); nothing over the cap.
    Round 2: global (0.8, 2.0, 1.2), local (0.8, 1.0, 1.4): excess (0, 1, 0): the third is
    -0.2, clipped to 0, not a reward. lam * (1, e, 1) normalised = (.283371, .536085, .180544);
    mixed (.288367, .515810, .195823); the second is capped at .5 and the others share .5 in
    proportion: (.297783, .5, .202217).
    """
    s = DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=0.5)
    excess = excess_loss(np.array([1.0, 2.0, 1.5]), np.array([0.5, 1.9, 1.5]))
    np.testing.assert_allclose(excess, [0.5, 0.1, 0.0], atol=1e-12)
    lam = update_lambda("regret", UNIFORM, excess, ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.428616, 0.298299, 0.273084], atol=2e-6)
    excess = excess_loss(np.array([0.8, 2.0, 1.2]), np.array([0.8, 1.0, 1.4]))
    np.testing.assert_allclose(excess, [0.0, 1.0, 0.0], atol=1e-12)
    lam = update_lambda("regret", lam, excess, ALL, UNIFORM, s)
    np.testing.assert_allclose(lam, [0.297783, 0.5, 0.202217], atol=2e-6)


def test_a_source_with_zero_excess_gains_no_weight() -> None:
    """Source 2's loss is the highest (3.0) but its own model does no better (3.0): plain EG
    raises its weight above the prior, regret does not; with no excess anywhere lambda stays at
    the prior."""
    s = DROSettings(max_step=1.0, eta=1.0, eps=0.1, cap=1.0)
    losses, local = np.array([1.0, 1.2, 3.0]), np.array([0.4, 1.0, 3.0])
    eg = update_lambda("eg", UNIFORM, losses, ALL, UNIFORM, s)
    regret = update_lambda("regret", UNIFORM, excess_loss(losses, local), ALL, UNIFORM, s)
    assert eg[2] > 1 / 3 + 0.1
    assert regret[2] < 1 / 3 and regret[2] == regret.min()
    none = update_lambda("regret", UNIFORM, excess_loss(losses, losses + 0.5), ALL, UNIFORM, s)
    np.testing.assert_allclose(none, UNIFORM, atol=1e-12)


def test_ema_by_hand() -> None:
    """beta 0.5. A first value is taken as it is (2, 6); then 0.5 * 2 + 0.5 * 4 = 3 for source
    0, source 1 silent keeps 6; source 2 never reported stays NaN."""
    first = ema(np.full(3, np.nan), np.array([2.0, 6.0, 9.0]), np.array([True, True, False]), 0.5)
    np.testing.assert_array_equal(first[:2], [2.0, 6.0])
    assert np.isnan(first[2])
    second = ema(first, np.array([4.0, 0.0, 0.0]), np.array([True, False, False]), 0.5)
    np.testing.assert_array_equal(second[:2], [3.0, 6.0])
    np.testing.assert_array_equal(ema(first, np.zeros(3), ALL, 0.0)[:2], [0.0, 0.0])
    with pytest.raises(ValueError, match="beta"):
        ema(first, first, ALL, 1.0)
