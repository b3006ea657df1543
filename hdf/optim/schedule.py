"""Learning-rate schedules: linear warm-up then cosine decay to a floor (docs/hdf_method.md §R5).

`warmup_cosine_factor` is the shape; `cosine_with_warmup` applies it per step inside one call of
the training loop, and `round_lr` across federated rounds (the server sends each round's lr);
`lr_of_round` is `round_lr` of the run's train settings, for the round loop and the pooled
baseline alike, and `fixed_norm_in_round` the other per-round switch those settings make.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from hdf.config.schema import TrainConfig


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> LambdaLR:
    """LambdaLR: factor (s+1)/warmup for s < warmup, then cosine from 1 to ``min_lr_ratio``.

    The released trainer uses timm's per-iteration CosineLRScheduler with a linear warm-up; this is
    the same shape, except that warm-up starts at lr / warmup instead of 0 so no step is wasted.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return LambdaLR(
        optimizer,
        lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio),
    )


def warmup_cosine_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """(step+1)/warmup during warm-up, then cosine from 1 down to `min_ratio` at `total`."""
    warmup, total = max(0, int(warmup)), max(1, int(total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def round_lr(
    base_lr: float, server_round: int, rounds: int, warmup: int, min_ratio: float
) -> float:
    """The lr of federated round `server_round` (1-based): the schedule stretched over rounds.

    Restarting a warm-up and cosine inside every client call, as a centralized trainer's per-step
    schedule would, spends each round's first steps warming up and its last near the floor; in
    federated training the decay belongs to the rounds and each round trains at one lr.
    """
    return base_lr * warmup_cosine_factor(server_round - 1, warmup, rounds, min_ratio)


def lr_of_round(train: TrainConfig, server_round: int, rounds: int) -> float:
    """The clients' lr in `server_round` of `rounds`: `train.lr` warmed up over
    `train.warmup_rounds`, then cosine down to `train.round_min_lr_ratio` of it."""
    return round_lr(
        float(train.lr),
        server_round,
        int(rounds),
        int(train.warmup_rounds),
        float(train.round_min_lr_ratio),
    )


def fixed_norm_in_round(train: TrainConfig, server_round: int, rounds: int) -> bool:
    """Whether `server_round` of `rounds` trains with fixed BatchNorm statistics (FixBN): the
    rounds after `train.fixed_norm_after` of the run; never when that is null."""
    after = train.fixed_norm_after
    return after is not None and server_round > float(after) * int(rounds)
