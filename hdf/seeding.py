"""Every seed derived from another one, in one place.

`round_seed`: per round (and source) from a run's ``seed``. Client training, the local-only and
centralized baselines, the server's node sampling and DRFA's draws all take their round's seed
from it, so a resumed run draws in round r exactly what the uninterrupted run drew.
`derive_seed`: from any parts (the synthetic benchmark's clips: generator version, seed, preset,
split, chunk), stable across processes and Python versions, so generated data never depends on
the run that asks for it.
"""

from __future__ import annotations

import hashlib


def round_seed(seed: int, server_round: int, source_index: int = 0) -> int:
    """Seed of one round's random draws, per source where there is one (< 2**31).

    Distinct (round, source) pairs get distinct seeds while source_index < 1009. Streams drawn
    by different generators (torch for local training, Python's `random` for node sampling,
    NumPy for DRFA) may share a value; they do not share a sequence.
    """
    return (int(seed) * 1_000_003 + int(server_round) * 1009 + int(source_index)) % (2**31)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
