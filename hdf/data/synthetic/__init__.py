"""The embedded synthetic multi-source DFER benchmark, registered as dataset ``synthetic``.

Procedurally drawn faces express one of the 7 emotions over each clip; every source is a named
preset (`presets.PRESETS`) with its own camera, timing, population, label mix and size. Splits are
generated on first use, deterministically from the config's seed, and cached under ``data.root``.
Config keys (``simulations/conf/data/synthetic.yaml``): name, root, seed, num_frames, size, scale,
sources (null = `DEFAULT_SOURCES`), heldout, train.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdf.data.source import SPLITS, SourceSet, TensorClipDataset, register_dataset
from hdf.data.synthetic import cache
from hdf.data.synthetic.generator import GENERATOR_THREADS, GENERATOR_VERSION, generate, split_size
from hdf.data.synthetic.presets import DEFAULT_SOURCES, PRESETS, Preset

__all__ = [
    "DEFAULT_SOURCES",
    "GENERATOR_VERSION",
    "PRESETS",
    "Preset",
    "SyntheticSources",
    "generate",
    "load_or_generate",
]


def load_or_generate(
    preset: Preset,
    split: str,
    *,
    root: str | Path,
    seed: int,
    num_frames: int,
    size: int,
    scale: float = 1.0,
) -> tuple[torch.Tensor, np.ndarray]:
    """(clips, labels) of one split from the cache under `root`, generated and saved if missing."""
    params = {
        "version": GENERATOR_VERSION,
        "preset": preset.params(),
        "split": split,
        "seed": int(seed),
        "num_frames": int(num_frames),
        "size": int(size),
        "clips": split_size(preset, split, scale),
        # files written before generation ran in a fixed thread count are not reused
        "threads": GENERATOR_THREADS,
    }
    path = Path(root) / f"{preset.name}-{split}-{cache.cache_key(params)}.pt"
    hit = cache.load(path)
    if hit is not None:
        return hit
    clips, labels = generate(
        preset, split, seed=seed, num_frames=num_frames, size=size, scale=scale
    )
    cache.save(path, clips, labels, params)
    return clips, labels


@register_dataset("synthetic")
class SyntheticSources(SourceSet):
    """The synthetic sources named by ``data.sources`` (default: every default preset, in order)."""

    cheap_splits = False  # splits are generated (slow) and never empty
    sizes_from_config = True  # `split_size(preset, split, scale)`: no file decides a size

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        names = cfg["sources"] or list(DEFAULT_SOURCES)
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            raise ValueError(
                f"unknown synthetic source(s) {unknown} in data.sources; "
                f"known presets: {', '.join(PRESETS)}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources lists a source twice: {list(names)}")
        self.names = [str(n) for n in names]
        scale = float(cfg["scale"])
        if scale <= 0:
            raise ValueError(f"data.scale must be positive, got {scale}")
        self.scale = scale

    def source_names(self) -> list[str]:
        return list(self.names)

    def load_split(self, name: str, split: str, source_index: int) -> TensorClipDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        clips, labels = load_or_generate(
            PRESETS[name],
            split,
            root=self.cfg["root"],
            seed=int(self.cfg["seed"]),
            num_frames=int(self.cfg["num_frames"]),
            size=int(self.cfg["size"]),
            scale=self.scale,
        )
        return TensorClipDataset(clips, labels, source_index)
