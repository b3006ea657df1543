"""Clips on disk (frame folders or videos) decoded on demand, plus helpers the real loaders share.

Decoding happens in `__getitem__`, so torch DataLoader workers decode in parallel. An unreadable
clip is replaced by the next readable one *with that clip's own label* (never a wrong label),
counted in `skipped` and its path kept in `bad_paths`; the count lives in shared memory so clips
found bad inside worker processes are still counted in the main process.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdf.data.frames import ClipReadError, read_clip
from hdf.data.source import ClipDataset

log = logging.getLogger(__name__)


class FolderClipDataset(ClipDataset):
    """A split as a list of (path, label) entries; each item decodes `path` (folder or video).

    Entries whose path does not exist are dropped at construction and counted as skipped, so
    `labels` (and `len`) describe only clips that can be tried. Training items sample random frame
    positions within segments (the rng is drawn from torch's generator, which the DataLoader seeds
    per worker and epoch); evaluation items take segment centres and are deterministic.
    """

    def __init__(
        self,
        entries: Sequence[tuple[str | Path, int]],
        source_index: int,
        *,
        num_frames: int,
        size: int,
        train: bool = False,
    ) -> None:
        present, missing = [], []
        for path, label in entries:
            if not 0 <= int(label) <= 6:
                raise ValueError(f"label {label} of {path} is outside 0..6")
            (present if Path(path).exists() else missing).append((str(path), int(label)))
        if missing:
            log.warning(
                "%d clip(s) listed but missing on disk, skipped (first: %s)",
                len(missing),
                ", ".join(p for p, _ in missing[:3]),
            )
        self.paths = [p for p, _ in present]
        self.labels = np.array([lab for _, lab in present], dtype=np.int64)
        self.source_index = int(source_index)
        self.num_frames = int(num_frames)
        self.size = int(size)
        self.train = bool(train)
        self.missing_paths = [p for p, _ in missing]
        # One flag per clip in shared memory: idempotent writes from any worker, no lost counts.
        self._bad = torch.zeros(len(present), dtype=torch.uint8).share_memory_()

    @property
    def skipped(self) -> int:
        """Clips missing at construction plus clips found unreadable so far (each counted once)."""
        return len(self.missing_paths) + int(self._bad.sum())

    @property
    def bad_paths(self) -> list[str]:
        """Paths of every skipped clip, for the end-of-run report."""
        bad = torch.nonzero(self._bad).flatten().tolist()
        return [*self.missing_paths, *(self.paths[i] for i in bad)]

    def _rng(self) -> np.random.Generator | None:
        if not self.train:
            return None
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        n = len(self.paths)
        if not 0 <= i < n:
            raise IndexError(f"clip index {i} out of range 0..{n - 1}")
        for step in range(n):
            j = (i + step) % n  # deterministic replacement: the next readable clip
            if self._bad[j]:
                continue
            try:
                clip = read_clip(self.paths[j], self.num_frames, self.size, self.train, self._rng())
            except ClipReadError as err:
                self._bad[j] = 1
                log.warning("skipping unreadable clip %s", err)
                continue
            return clip, int(self.labels[j]), self.source_index
        raise RuntimeError(
            f"every one of the {n} clips of this split is unreadable (first: {self.paths[:3]}); "
            f"check the data root and that the frames or videos decode"
        )


def stable_hash(key: str) -> float:
    """A number in [0, 1) from a string, identical across processes and machines (not `hash`)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_bucket(key: str, buckets: int) -> int:
    """Deterministic bucket 0..buckets-1 of a key (used to cut a dataset into sources)."""
    return min(int(stable_hash(key) * buckets), buckets - 1)


def hash_split(
    keys: Sequence[str], fractions: Mapping[str, float], salt: str = "split"
) -> list[str]:
    """Assign each key to a split name, deterministically, with exactly rounded fractions.

    Keys are ranked by a salted hash, so the assignment needs no seed and barely moves when clips
    are added. `fractions` maps split names (except "train") to shares; each non-zero share gets at
    least one clip when there are at least two keys, and "train" keeps the rest.
    """
    total = sum(fractions.values())
    if any(f < 0 for f in fractions.values()) or total >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum below 1, got {dict(fractions)}")
    n = len(keys)
    order = sorted(range(n), key=lambda k: (stable_hash(f"{salt}:{keys[k]}"), keys[k]))
    out = ["train"] * n
    pos = 0
    for name, frac in fractions.items():
        want = round(frac * n)
        if frac > 0 and want == 0 and n >= 2:
            want = 1
        want = min(want, max(n - pos - 1, 0))  # train keeps at least one clip
        for k in order[pos : pos + want]:
            out[k] = name
        pos += want
    return out


def select_sources(
    available: Sequence[str], wanted: Iterable[str] | None, key: str = "data.sources"
) -> list[str]:
    """`wanted` (in its own order) checked against `available`, or all of `available`."""
    if wanted is None:
        return list(available)
    wanted = [str(w) for w in wanted]
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown} in {key}; available: {list(available)}")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"{key} lists a source twice: {wanted}")
    return wanted


def clip_options(cfg: Mapping[str, Any]) -> dict[str, int]:
    """num_frames and size of a data config (the keys every real loader shares)."""
    num_frames, size = int(cfg["num_frames"]), int(cfg["size"])
    if num_frames <= 0 or size <= 0:
        raise ValueError(f"data.num_frames and data.size must be > 0, got {num_frames}, {size}")
    return {"num_frames": num_frames, "size": size}
