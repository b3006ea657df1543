"""The lr schedule over federated rounds, against hand computation."""

import itertools
import math

import pytest

from hdf.config.schema import TrainConfig
from hdf.optim.schedule import fixed_norm_in_round, lr_of_round, round_lr


def test_round_lr_warms_up_then_decays_to_the_floor() -> None:
    """10 rounds, 2 warm-up rounds, floor 0.1 of lr = 2.0.

    Round 1: (0+1)/2 = 0.5 -> 1.0; round 2: 2/2 -> 2.0 (the peak, progress 0);
    round 10: progress (9-2)/(10-2) = 7/8, factor 0.1 + 0.9 * (1 + cos(7 pi / 8)) / 2
    = 0.1 + 0.45 * (1 - 0.9238795) = 0.1342542 -> 0.2685084.
    """
    lrs = [round_lr(2.0, r, 10, 2, 0.1) for r in range(1, 11)]
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[1] == pytest.approx(2.0)
    assert lrs[-1] == pytest.approx(0.2685084, abs=1e-6)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))  # monotone after warm-up
    assert lrs[-1] == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8))))


def test_lr_of_round_reads_the_train_settings() -> None:
    """lr 2, 2 warm-up rounds, floor 0.1, 5 rounds: round 1 is 2 * 1/2; round 2 the peak 2;
    round 5 is cosine at progress (4 - 2) / 3: 2 * (0.1 + 0.9 * 0.5 * (1 + cos(2 pi / 3)))."""
    t = TrainConfig(lr=2.0, warmup_rounds=2, round_min_lr_ratio=0.1)
    assert lr_of_round(t, 1, 5) == pytest.approx(1.0)
    assert lr_of_round(t, 2, 5) == pytest.approx(2.0)
    assert lr_of_round(t, 5, 5) == pytest.approx(2 * (0.1 + 0.9 * 0.25))


@pytest.mark.parametrize(
    ("after", "rounds", "fixed"),
    [(None, 4, []), (0.5, 4, [3, 4]), (0.5, 5, [3, 4, 5]), (0.0, 3, [1, 2, 3]), (1.0, 3, [])],
)
def test_fixed_norm_takes_the_rounds_after_its_fraction(after, rounds, fixed) -> None:
    """FixBN's rounds: those after `fixed_norm_after` x rounds (0.5 of 5: 2.5, so 3, 4, 5)."""
    t = TrainConfig(fixed_norm_after=after)
    assert [r for r in range(1, rounds + 1) if fixed_norm_in_round(t, r, rounds)] == fixed
