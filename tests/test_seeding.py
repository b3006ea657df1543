"""Per-round seeds: the formula by hand, distinct per (round, source), stable for a resume."""

from __future__ import annotations

from hdf.seeding import round_seed


def test_round_seed_by_hand() -> None:
    """(seed * 1000003 + round * 1009 + source) mod 2**31; large seeds wrap below 2**31."""
    assert round_seed(0, 1) == 1009
    assert round_seed(3, 2, 4) == 3 * 1_000_003 + 2 * 1009 + 4
    assert round_seed(10**6, 5, 1) == (10**6 * 1_000_003 + 5 * 1009 + 1) % 2**31
    assert 0 <= round_seed(2**40, 10**6, 7) < 2**31


def test_round_seed_is_distinct_per_round_and_source() -> None:
    """Every (round, source) of a long run with many sources trains on its own stream."""
    seeds = {round_seed(7, r, s) for r in range(1, 501) for s in range(64)}
    assert len(seeds) == 500 * 64
