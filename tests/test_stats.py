"""The paired-t interval and its t quantile against hand computations and printed tables."""

from __future__ import annotations

import math

import pytest

from simulations.stats import PairedDiff, paired_ci, t_quantile, t_two_sided_cdf, verdict


@pytest.mark.parametrize(
    ("df", "q"),  # t_{0.975, df} from printed tables (NIST/SEMATECH e-Handbook, Table 1.3.6.7.2)
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (10, 2.228), (29, 2.045)],
)
def test_t_quantile_matches_the_table(df: int, q: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(q, abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-q, abs=6e-4)


def test_t_cdf_closed_forms() -> None:
    """df 1 is Cauchy: P(|T| <= 1) = 1/2; df 2: P(|T| <= t) = t / sqrt(2 + t^2)."""
    assert t_two_sided_cdf(1.0, 1) == pytest.approx(0.5, abs=1e-15)
    assert t_two_sided_cdf(3.0, 2) == pytest.approx(3 / math.sqrt(11), abs=1e-15)
    assert t_quantile(0.75, 1) == pytest.approx(1.0, abs=1e-12)  # Cauchy quartile
    assert t_quantile(0.975, 2) == pytest.approx(math.sqrt(2 * 0.95**2 / (1 - 0.95**2)), 1e-12)
    assert t_quantile(0.975, 400) == pytest.approx(1.966, abs=1e-3)  # -> the normal 1.960


def test_paired_ci_by_hand() -> None:
    """d = (1, 2, 3, 6): mean 3, sd sqrt(14/3), se sqrt(14/3)/2, t_{.975,3} = 3.18245:
    3 +- 3.18245 * 1.08012 = [-0.4374, 6.4374]; covers 0."""
    p = paired_ci([1.5, 2.0, 3.5, 6.0], [0.5, 0.0, 0.5, 0.0])
    assert p.diff == pytest.approx(3.0) and p.n == 4
    half = 3.1824463 * math.sqrt(14 / 3) / 2
    assert p.lo == pytest.approx(3.0 - half, abs=1e-6)
    assert p.hi == pytest.approx(3.0 + half, abs=1e-6)
    assert verdict(p) == "not distinguishable"
    assert verdict(paired_ci([2.0, 2.1, 2.2], [1.0, 1.0, 1.0])) == "better"  # 1.1 +- 0.248
    assert verdict(paired_ci([0.0, 0.1, 0.2], [1.0, 1.0, 1.0])) == "worse"
    assert verdict(PairedDiff(1.0, None, None, 1)) == "too few pairs"
    assert paired_ci([0.75, 0.5], [0.25, 0.0]) == PairedDiff(0.5, 0.5, 0.5, 2)  # sd 0
    with pytest.raises(ValueError, match="length"):
        paired_ci([1.0], [1.0, 2.0])
