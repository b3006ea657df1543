"""Sources: named, indexed sets of labelled clips with train/val/test splits (docs/design.md §3).

A clip is a uint8 tensor T x C x H x W, a label in 0..6 (`hdf.classes.EMOTIONS` order) and the
index of its source. Datasets are registered by name; `build_sources` turns a data config into the
ordered list of sources, whose splits load lazily so a client only ever reads its own source.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hdf.config.tree import group_node
from hdf.registry import Registry

SPLITS = ("train", "val", "test")


class ClipDataset(Dataset):
    """Base of every split: items are (clip uint8 T x C x H x W, label, source index).

    Subclasses set `labels` (int64 array, one per clip) so counts and histograms need no decoding,
    and increment `skipped` for every unreadable clip they replace (reported at the end of a run).
    """

    labels: np.ndarray
    source_index: int
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]: ...


class TensorClipDataset(ClipDataset):
    """Clips held in memory as one uint8 tensor N x T x C x H x W (the synthetic benchmark)."""

    def __init__(self, clips: torch.Tensor, labels: np.ndarray, source_index: int) -> None:
        if clips.dtype != torch.uint8 or clips.ndim != 5:
            raise ValueError(
                f"clips must be uint8 N x T x C x H x W, got {clips.dtype} {tuple(clips.shape)}"
            )
        if len(clips) != len(labels):
            raise ValueError(f"{len(clips)} clips but {len(labels)} labels")
        self.clips = clips
        self.labels = np.asarray(labels, dtype=np.int64)
        self.source_index = source_index

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.clips[i], int(self.labels[i]), self.source_index


class ConcatClipDataset(ClipDataset):
    """Several splits pooled (the centralized baseline); items keep their own source index."""

    def __init__(self, parts: list[ClipDataset]) -> None:
        if not parts:
            raise ValueError("nothing to pool: no splits given")
        self.parts = parts
        self.labels = np.concatenate([p.labels for p in parts])
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.source_index = -1

    @property
    def skipped(self) -> int:
        return sum(p.skipped for p in self.parts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k][i - int(self.offsets[k])]


class PartBatchSampler(Sampler[list[int]]):
    """Batches of a `ConcatClipDataset` that each hold one part's clips, in a random order.

    A federated site's batches come from its one source; the pooled baseline's mix sources, so
    its BatchNorm statistics and DSM's contrastive positives span sources. Batching the pooled
    data by source (`train.source_batches`) isolates what that mixing buys. A pass has
    sum(ceil(n_k / batch_size)) batches, a few more than mixed batching's ceil(n / batch_size).
    """

    def __init__(self, data: ConcatClipDataset, batch_size: int, generator: torch.Generator):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.offsets = [int(o) for o in data.offsets]
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        sizes = np.diff(self.offsets)
        return int(sum(-(-int(n) // self.batch_size) for n in sizes))

    def __iter__(self):
        batches: list[list[int]] = []
        for start, end in zip(self.offsets[:-1], self.offsets[1:], strict=True):
            order = (torch.randperm(end - start, generator=self.generator) + start).tolist()
            batches += [
                order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)
            ]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


class SourceSet(ABC):
    """One registered dataset kind: knows its source names and loads one split of one source.

    `cheap_splits` says that loading a split only reads file lists (decoding happens per item), so
    a run checks every split it needs before it starts; a kind whose splits are generated (the
    synthetic benchmark: seconds to minutes each, never empty) sets it False. `sizes_from_config`
    says every split's size follows from the data config and this code alone (never from files
    that may change), so a site may answer node discovery from a saved index (`client.site_index`).
    """

    cheap_splits: bool = True
    sizes_from_config: bool = False

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg

    @abstractmethod
    def source_names(self) -> list[str]:
        """Stable, ordered names of every source this dataset provides."""

    @abstractmethod
    def load_split(self, name: str, split: str, source_index: int) -> ClipDataset:
        """The clips of `split` ("train", "val" or "test") of source `name`."""


@dataclass
class Source:
    """A named source with a stable index in the run's ordered source list."""

    name: str
    index: int
    dataset: SourceSet = field(repr=False)
    _cache: dict[str, ClipDataset] = field(default_factory=dict, repr=False)

    def split(self, split: str) -> ClipDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._cache:
            ds = self.dataset.load_split(self.name, split, self.index)
            if len(ds) == 0:
                missing = list(getattr(ds, "missing_paths", []))
                why = (
                    f": all {len(missing)} clip(s) it lists are missing on disk (first: "
                    f"{missing[0]}); fix data.root or the listed paths"
                    if missing
                    else "; check the data config (root, split files, source rule)"
                )
                raise ValueError(
                    f"source {self.name!r} has no clips in its {split!r} split{why}, or drop the "
                    "source from the run (data.sources / data.heldout)"
                )
            self._cache[split] = ds
        return self._cache[split]


DATASETS: Registry[Callable[[Mapping[str, Any]], SourceSet]] = Registry(
    "dataset", "set data.name=<name> or pick a file in simulations/conf/data/"
)
register_dataset = DATASETS.register  # class decorator: @register_dataset("dfew")
list_datasets = DATASETS.names


def build_sources(cfg: Mapping[str, Any]) -> list[Source]:
    """Ordered sources of a data config (checked against its dataset's schema, which fills in
    the keys it leaves out); the list position is each source's stable index."""
    dataset = DATASETS.lookup(cfg["name"])(group_node("data", cfg))
    return [Source(n, i, dataset) for i, n in enumerate(dataset.source_names())]


def split_sources(
    sources: list[Source], heldout: list[str] | None, train: list[str] | None = None
) -> tuple[list[Source], list[Source]]:
    """(training sources, held-out sources) named by a run's config; unknown names are errors."""
    names = [s.name for s in sources]
    for n in [*(heldout or []), *(train or [])]:
        if n not in names:
            raise ValueError(f"unknown source {n!r} in the run config; known sources: {names}")
    held = [s for s in sources if s.name in (heldout or [])]
    trainable = [s for s in sources if s not in held and (not train or s.name in train)]
    if not trainable:
        raise ValueError("no training source left after removing the held-out ones")
    return trainable, held
