"""Data sources and the clip pipeline; importing this registers every dataset."""

# Importing each dataset module registers it under its `data.name`.
from hdf.data import dfew, ferv39k, manifest, multi, synthetic  # noqa: F401
from hdf.data.source import (
    SPLITS,
    ClipDataset,
    ConcatClipDataset,
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
    "ConcatClipDataset",
    "Source",
    "SourceSet",
    "TensorClipDataset",
    "build_sources",
    "list_datasets",
    "register_dataset",
    "split_sources",
]
