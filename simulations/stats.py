"""Paired differences with a Student-t confidence interval, for comparing strategies.

Two strategies run on the same (seed, held-out source) pairs share the data order, the initial
model and the held-out split, so their difference per pair cancels most of the seed-to-seed
spread; the interval is the paired t interval mean(d) +- t_{(1+level)/2, n-1} sd(d) / sqrt(n).

scipy is not a dependency, so the t quantile is computed here: the two-sided CDF of Student's t
with an integer number of degrees of freedom has a closed form (Abramowitz & Stegun 26.7.3 and
26.7.4, finite sums in theta = atan(t / sqrt(df))), and the quantile is found by bisection on it
(exact to ~1e-12 for any df >= 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


def t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (a positive integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    t = abs(float(t))
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:  # A&S 26.7.3: (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2.4/3.5 cos^4 ...))
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0  # A&S 26.7.4: sin (1 + 1/2 cos^2 + 1.3/2.4 cos^4 + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    target = 2.0 * p - 1.0  # P(|T| <= q) for the upper quantile q
    lo, hi = 0.0, 1.0
    while t_two_sided_cdf(hi, df) < target:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_cdf(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedDiff:
    """mean(a - b) over n pairs and its confidence interval (None below 2 pairs)."""

    diff: float
    lo: float | None
    hi: float | None
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"diff": self.diff, "lo": self.lo, "hi": self.hi, "n": self.n}


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> PairedDiff:
    """The paired-t interval of mean(a - b); a[i] and b[i] are one pair."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no pairs to compare")
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return PairedDiff(mean, None, None, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return PairedDiff(mean, mean - half, mean + half, n)


def verdict(p: PairedDiff) -> str:
    """What the interval says (higher is better): it lies above 0, below 0, or covers 0."""
    if p.lo is None or p.hi is None:
        return "too few pairs"
    if p.lo > 0:
        return "better"
    if p.hi < 0:
        return "worse"
    return "not distinguishable"
