"""When each of a clip's T frames was captured: frame rate, dropped and duplicated frames."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """A source's capture timing; the T frames are sampled evenly across `duration` seconds."""

    duration: float = 2.5  # seconds of video the T frames cover
    fps: float = 30.0  # native frame rate: frame times snap to its grid (low fps = repeats)
    drop: float = 0.0  # per frame, chance that native frames were lost (the clip jumps ahead)
    dup: float = 0.0  # per frame, chance the frame repeats the previous one (frozen / telecine)
    onset: tuple[float, float] = (0.05, 0.45)  # expression onset, as a fraction of `duration`
    start_jitter: float = 0.2  # random shift of the window, seconds


def frame_times(b: int, t: int, timing: Timing, g: torch.Generator) -> torch.Tensor:
    """B x T capture times in seconds, non-decreasing, on the source's native frame grid."""
    step = timing.duration / max(t - 1, 1)
    base = torch.arange(t, dtype=torch.float32) * step
    start = (torch.rand(b, 1, generator=g) - 0.5) * 2 * timing.start_jitter
    r = torch.rand(b, t, 2, generator=g)
    # a drop loses one to three native frames, shifting every later frame
    lost = (r[..., 0] < timing.drop).float() * (1 + (r[..., 1] * 3).floor()) / timing.fps
    lost[:, 0] = 0
    times = base[None, :] + start + lost.cumsum(1)
    times = torch.round(times * timing.fps) / timing.fps
    dup = torch.rand(b, t, generator=g) < timing.dup
    dup[:, 0] = False
    for i in range(1, t):  # a duplicate repeats the previous frame's time
        times[:, i] = torch.where(dup[:, i], times[:, i - 1], times[:, i])
    return times
