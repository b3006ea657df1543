"""Generate the clips of one source split: people, expressions, motion, rendering, camera.

Randomness is drawn from `torch.Generator`s seeded by hashing (seed, source, split) and, per chunk
of clips, the chunk index, so the same arguments give bit-identical clips and every (source, split)
has its own stream. Different splits draw different people, so validation and test measure
generalisation to new faces.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hdf.classes import EMOTIONS
from hdf.data.synthetic.camera import capture, native_res
from hdf.data.synthetic.expressions import (
    A,
    apex_actions,
    blinks,
    body_motion,
    envelope,
    talking,
)
from hdf.data.synthetic.faces import background, render, sample_identities
from hdf.data.synthetic.presets import Preset
from hdf.data.synthetic.timing import frame_times
from hdf.device import torch_threads
from hdf.seeding import derive_seed

# Bump whenever the generated pixels or labels change, so stale caches are never reused.
GENERATOR_VERSION = "synthetic-v2"
CHUNK = 16  # clips rendered per tensor batch (part of the random stream: keep fixed)
GENERATOR_THREADS = 1  # torch threads while rendering: the pixels depend on it (in cache keys)


def split_size(preset: Preset, split: str, scale: float) -> int:
    """Clips in `split` at `scale` (never zero: an empty split is an error downstream)."""
    n = preset.sizes[("train", "val", "test").index(split)]
    return max(1, round(n * scale))


def label_counts(weights: tuple[float, ...], n: int) -> np.ndarray:
    """Exact per-class counts for `n` clips (largest remainder), so histograms are stable."""
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def split_labels(preset: Preset, n: int, g: torch.Generator) -> torch.Tensor:
    counts = label_counts(preset.labels, n)
    labels = torch.repeat_interleave(torch.arange(len(EMOTIONS)), torch.from_numpy(counts))
    return labels[torch.randperm(n, generator=g)]


def _wave(b: int, t: torch.Tensor, amp: float, g: torch.Generator) -> torch.Tensor:
    """B x T smooth random motion: a static offset plus two sinusoids (0.15 to 1.5 Hz)."""
    r = torch.rand(b, 5, generator=g)
    f1, f2 = 0.15 + 0.6 * r[:, 0:1], 0.5 + 1.0 * r[:, 1:2]
    w = torch.sin(2 * math.pi * f1 * t + 6.3 * r[:, 2:3]) + 0.5 * torch.sin(
        2 * math.pi * f2 * t + 6.3 * r[:, 3:4]
    )
    return amp * (w * 0.6 + (r[:, 4:5] - 0.5))


def _render_chunk(
    preset: Preset,
    labels: torch.Tensor,
    people: dict[str, torch.Tensor],
    num_frames: int,
    size: int,
    g: torch.Generator,
) -> torch.Tensor:
    b, pop, tim, cam = len(labels), preset.population, preset.timing, preset.camera
    res = native_res(cam, size)
    times = frame_times(b, num_frames, tim, g)
    intensity = pop.intensity * torch.exp(pop.intensity_spread * torch.randn(b, generator=g))
    intensity = intensity.clamp(0.1, 1.4)
    env = envelope(times, tim.duration, tim.onset, g)
    acts = apex_actions(labels, intensity, g)[:, None, :] * env[..., None]
    jaw, stretch = talking(times, pop.talk, g)
    acts[..., A["jaw_drop"]] += jaw
    acts[..., A["lip_stretch"]] += stretch
    m = pop.motion
    body = body_motion(labels, intensity, env, times, g)
    pose = {
        "cx": _wave(b, times, 0.05 * m, g),
        "cy": -0.05 + _wave(b, times, 0.04 * m, g) + body["cy"],
        "rot": _wave(b, times, 0.08 * m, g),
        "scale": 1.4
        + 0.1 * (torch.rand(b, 1, generator=g) - 0.5)
        + _wave(b, times, 0.03 * m, g)
        + body["scale"],
        "yaw": _wave(b, times, 0.6 * min(m, 1.5), g) + body["yaw"],
        "pitch": _wave(b, times, 0.4 * min(m, 1.5), g),
        "blink": blinks(times, tim.duration, pop.blink_rate, g),
        "gaze_x": (torch.rand(b, 1, generator=g) - 0.5).expand(b, num_frames)
        + 0.15 * torch.randn(b, num_frames, generator=g),
        "gaze_y": 0.006 * torch.randn(b, num_frames, generator=g),
    }
    bgs = torch.tensor(preset.backgrounds)
    shirts = torch.tensor(preset.shirts)
    angle = torch.rand(b, generator=g) * 2 * math.pi
    scene = {
        "bg": background(b, res, bgs[torch.randint(0, len(bgs), (b,), generator=g)], g),
        "shirt": shirts[torch.randint(0, len(shirts), (b,), generator=g)]
        * (0.7 + 0.6 * torch.rand(b, 3, generator=g)),
        "light": cam.light * torch.stack([torch.cos(angle), torch.sin(angle) * 0.5], 1),
        "frame": 0.1 + 0.3 * torch.rand(b, 3, generator=g),
        "lens": torch.tensor([0.75, 0.85, 0.95]).expand(b, 3),
    }
    img, head = render(people, acts, pose, scene, res)
    return capture(img, head, cam, size, g)


def generate(
    preset: Preset,
    split: str,
    *,
    seed: int,
    num_frames: int,
    size: int,
    scale: float = 1.0,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """(clips uint8 N x T x 3 x size x size, labels int64 N) of one source split.

    `labels` forces the classes (e.g. one clip per class for a preview); by default the split's
    size and label mix come from the preset.
    """
    base = derive_seed(GENERATOR_VERSION, seed, preset.name, split)
    g = torch.Generator().manual_seed(base)
    if labels is None:
        labels = split_labels(preset, split_size(preset, split, scale), g)
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = len(labels)
    n_people = max(1, round(n / preset.population.clips_per_id))
    pool = sample_identities(preset.population, n_people, g)
    person = torch.randint(0, n_people, (n,), generator=g)
    out = torch.empty(n, num_frames, 3, size, size, dtype=torch.uint8)
    # one thread: the blur's batched matmul rounds differently with more (4 threads changed
    # phone's pixels), and a split must not depend on the process that generated it first
    with torch.no_grad(), torch_threads(GENERATOR_THREADS):
        for k, start in enumerate(range(0, n, CHUNK)):
            sl = slice(start, min(start + CHUNK, n))
            gk = torch.Generator().manual_seed(derive_seed(base, "chunk", k))
            people = {name: val[person[sl]] for name, val in pool.items()}
            out[sl] = _render_chunk(preset, labels[sl], people, num_frames, size, gk)
    return out, labels.numpy().astype(np.int64)
