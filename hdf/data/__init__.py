"""Data sources and the clip pipeline; importing this registers every dataset."""

from hdf.data import synthetic as synthetic
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
