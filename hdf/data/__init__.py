"""Data sources and the clip pipeline; importing this registers every dataset."""

from hdf.data import synthetic as synthetic  # noqa: F401  (registers "synthetic")
from hdf.data.source import (
    SPLITS,
    ClipDataset,
    Source,
    SourceSet,
    TensorClipDataset,
    build_sources,
    list_datasets,
    register_dataset,
    split_sources,
)

__all__ = [
    "SPLITS",
    "ClipDataset",
    "Source",
    "SourceSet",
    "TensorClipDataset",
    "build_sources",
    "list_datasets",
    "register_dataset",
    "split_sources",
]
