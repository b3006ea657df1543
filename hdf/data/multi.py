"""Several datasets, registered as dataset ``multi`` (cross-dataset shift, docs/design.md §3).

`datasets` is a list of data configs (each with its own `name`, e.g. dfew, ferv39k, manifest) or a
mapping alias -> data config (easier to override from the command line:
`data.datasets.dfew.root=PATH`, `~data.datasets.ferv39k`). Every source of every dataset becomes a
source of the run named `<alias>/<source>` (alias = the mapping key, the entry's `alias` key, or
its `name`); with `one_source_per_dataset: true` each whole dataset is one source `<alias>`.
`num_frames`, `size` and `seed` are passed down unless an entry sets its own.
Config keys (``simulations/conf/data/multi.yaml``): datasets, one_source_per_dataset, sources.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# The datasets a `multi` config usually combines register themselves on import.
from hdf.data import dfew as dfew
from hdf.data import ferv39k as ferv39k
from hdf.data import manifest as manifest
from hdf.data.folder_dataset import select_sources
from hdf.data.source import (
    SPLITS,
    ClipDataset,
    ConcatClipDataset,
    Source,
    SourceSet,
    build_sources,
    register_dataset,
)

_INHERITED = ("num_frames", "size", "seed")


class _Empty(ClipDataset):
    """A split with no clips, so `Source.split` reports it by name at start-up."""

    def __init__(self, source_index: int) -> None:
        self.labels = np.zeros(0, dtype=np.int64)
        self.source_index = source_index

    def __getitem__(self, i: int) -> Any:
        raise IndexError(i)


@register_dataset("multi")
class MultiSources(SourceSet):
    """The union of several datasets' sources, each name prefixed by its dataset's alias."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        entries = cfg["datasets"]
        if not entries:
            raise ValueError("data.datasets is empty; list the data configs to combine")
        if isinstance(entries, Mapping):
            items = [(str(k), v) for k, v in entries.items() if v is not None]
        else:
            items = [(None, v) for v in entries]
        self.parts: dict[str, list[Source]] = {}
        for key, entry in items:
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise ValueError(f"each entry of data.datasets needs a `name` key, got {entry!r}")
            if entry["name"] == "multi":
                raise ValueError("data.datasets cannot contain another `multi` dataset")
            alias = str(key or entry.get("alias") or entry["name"])
            if "/" in alias:
                raise ValueError(f"dataset alias {alias!r} must not contain '/'")
            if alias in self.parts:
                raise ValueError(
                    f"two entries of data.datasets are called {alias!r}; give one an `alias`"
                )
            sub = {k: cfg[k] for k in _INHERITED if k in cfg}
            sub.update({str(k): v for k, v in entry.items() if k != "alias"})
            self.parts[alias] = build_sources(sub)
        self.one_per_dataset = bool(cfg["one_source_per_dataset"])
        if self.one_per_dataset:
            names = list(self.parts)
        else:
            names = [f"{a}/{s.name}" for a, srcs in self.parts.items() for s in srcs]
        self.names = select_sources(names, cfg["sources"])

    @property
    def cheap_splits(self) -> bool:  # type: ignore[override]
        return all(s.dataset.cheap_splits for srcs in self.parts.values() for s in srcs)

    def source_names(self) -> list[str]:
        return list(self.names)

    def load_split(self, name: str, split: str, source_index: int) -> ClipDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self.one_per_dataset:
            # Each part is loaded with this run's index so its items carry the run's source index.
            parts = [s.dataset.load_split(s.name, split, source_index) for s in self.parts[name]]
            parts = [p for p in parts if len(p)]
            if not parts:
                return _Empty(source_index)
            pooled = ConcatClipDataset(parts)
            pooled.source_index = source_index
            return pooled
        alias, _, inner = name.partition("/")
        src = next(s for s in self.parts[alias] if s.name == inner)
        return src.dataset.load_split(src.name, split, source_index)
