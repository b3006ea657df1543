"""The one derivation of per-round seeds from a run's ``seed`` (local training, sampling).

Client training, the local-only and centralized baselines, the server's node sampling and DRFA's
draws all take their round's seed from `round_seed`, so a resumed run draws in round r exactly
what the uninterrupted run drew, and the formula lives in one place.
"""

from __future__ import annotations


def round_seed(seed: int, server_round: int, source_index: int = 0) -> int:
    """Seed of one round's random draws, per source where there is one (< 2**31).

    Distinct (round, source) pairs get distinct seeds while source_index < 1009. Streams drawn
    by different generators (torch for local training, Python's `random` for node sampling,
    NumPy for DRFA) may share a value; they do not share a sequence.
    """
    return (int(seed) * 1_000_003 + int(server_round) * 1009 + int(source_index)) % (2**31)
