"""Per-step learning-rate schedule: linear warm-up then cosine decay to a floor (paper Sec. 5)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> LambdaLR:
    """LambdaLR: factor (s+1)/warmup for s < warmup, then cosine from 1 to ``min_lr_ratio``.

    The released trainer uses timm's per-iteration CosineLRScheduler with a linear warm-up; this is
    the same shape, except that warm-up starts at lr / warmup instead of 0 so no step is wasted.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup = max(0, int(warmup_steps))
    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
