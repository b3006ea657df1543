"""DFEW in its official layout, registered as dataset ``dfew`` (docs/datasets.md).

    <root>/Clip/clip_224x224/00001/00001_00001.jpg ...  (or Clip/clip_224x224_16f/: key variant)
    <root>/EmoLabel_DataSplit/train(single-labeled)/set_1.csv ... set_5.csv
    <root>/EmoLabel_DataSplit/test(single-labeled)/set_1.csv ...  (header video_name,label)

Labels are 1-based in the official files (1 Happy .. 7 Fear) and shifted to the 0-based
`hdf.classes.EMOTIONS` order. DFEW has no validation split: a deterministic `val_fraction` of each
source's part of the fold's training list is held back. DFEW is one corpus; `sources_rule` cuts it
into sources: `whole` (one source "dfew"), `hash` (`num_sources` parts by a hash of the clip id,
named part0..) or `csv` (`source_csv`: a CSV with columns video_name,source).
Config keys (``simulations/conf/data/dfew.yaml``): root, variant, fold, val_fraction, label_base,
sources_rule, num_sources, source_csv, sources, num_frames, size.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hdf.data.folder_dataset import (
    FolderClipDataset,
    clip_options,
    hash_bucket,
    hash_split,
    select_sources,
)
from hdf.data.source import SPLITS, SourceSet, register_dataset

log = logging.getLogger(__name__)

VARIANTS = ("clip_224x224", "clip_224x224_16f")
RULES = ("whole", "hash", "csv")
# The release README spells the folders with "_" and the common codebases with "-": accept both.
_SPLIT_DIRS = {
    "train": ("train(single-labeled)", "train(single_labeled)"),
    "test": ("test(single-labeled)", "test(single_labeled)"),
}


def _clip_id(value: str) -> str:
    """Split files store the clip id as an int (1), the folders are zero-padded (00001)."""
    value = value.strip()
    return f"{int(value):05d}" if value.isdigit() else value


def read_csv_columns(path: Path, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    """Rows of a headed CSV, after checking that it exists and has the `required` columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; expected a header with "
                f"{', '.join(required)}, found {header}"
            )
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]


@register_dataset("dfew")
class DFEWSources(SourceSet):
    """DFEW fold `fold` (1..5), cut into sources by `sources_rule`."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.options = clip_options(cfg)
        root = Path(str(cfg["root"])).expanduser()
        self.variant = str(cfg["variant"])
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown data.variant {self.variant!r}; expected one of {VARIANTS}")
        if not root.is_dir():
            raise FileNotFoundError(
                f"DFEW root {root} does not exist; expected a folder holding "
                f"Clip/{self.variant}/ and EmoLabel_DataSplit/ (set data.root)"
            )
        self.clips_dir = root / "Clip" / self.variant
        if not self.clips_dir.is_dir():
            raise FileNotFoundError(
                f"DFEW frame folder {self.clips_dir} not found; expected Clip/{self.variant}/"
                f"NNNNN/ frame folders under data.root (data.variant picks {' or '.join(VARIANTS)})"
            )
        self.fold = int(cfg["fold"])
        if not 1 <= self.fold <= 5:
            raise ValueError(f"data.fold must be 1..5 (DFEW's 5-fold protocol), got {self.fold}")
        self.val_fraction = float(cfg["val_fraction"])
        self.label_base = int(cfg["label_base"])
        self.rows = {s: self._read_split(root, s) for s in ("train", "test")}

        self.rule = str(cfg["sources_rule"])
        if self.rule == "whole":
            names = ["dfew"]
            self._source_of = {v: "dfew" for rows in self.rows.values() for v, _ in rows}
        elif self.rule == "hash":
            k = int(cfg["num_sources"])
            if k < 1:
                raise ValueError(f"sources_rule 'hash' needs data.num_sources >= 1, got {k}")
            names = [f"part{i}" for i in range(k)]
            ids = [v for rows in self.rows.values() for v, _ in rows]
            self._source_of = {v: names[hash_bucket(f"dfew:{v}", k)] for v in ids}
        elif self.rule == "csv":
            self._source_of, names = self._read_source_csv(cfg["source_csv"])
        else:
            raise ValueError(f"unknown data.sources_rule {self.rule!r}; expected one of {RULES}")
        self.names = select_sources(names, cfg["sources"])

    def _read_split(self, root: Path, split: str) -> list[tuple[str, int]]:
        base = root / "EmoLabel_DataSplit"
        candidates = [base / d / f"set_{self.fold}.csv" for d in _SPLIT_DIRS[split]]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"DFEW {split} split file for fold {self.fold} not found: looked for "
                f"{' and '.join(str(p) for p in candidates)}"
            )
        rows = []
        for line, row in enumerate(read_csv_columns(path, ("video_name", "label"), "split"), 2):
            try:
                label = int(row["label"]) - self.label_base
            except ValueError:
                label = -1
            if not 0 <= label <= 6:
                raise ValueError(
                    f"{path}:{line}: label {row['label']!r} is not in {self.label_base}.."
                    f"{self.label_base + 6} (official DFEW files are 1-based; set "
                    f"data.label_base: 0 for 0-based copies)"
                )
            rows.append((_clip_id(row["video_name"]), label))
        return rows

    def _read_source_csv(self, source_csv: Any) -> tuple[dict[str, str], list[str]]:
        if not source_csv:
            raise ValueError("sources_rule 'csv' needs data.source_csv (columns video_name,source)")
        path = Path(str(source_csv)).expanduser()
        rows = read_csv_columns(path, ("video_name", "source"), "source CSV")
        mapping = {_clip_id(r["video_name"]): r["source"] for r in rows if r["source"]}
        listed = {v for rows_ in self.rows.values() for v, _ in rows_}
        unmapped = len(listed - set(mapping))
        if unmapped:
            log.warning(
                "%d DFEW clip(s) of fold %d have no source in %s; left out",
                unmapped,
                self.fold,
                path,
            )
        return mapping, sorted(set(mapping.values()))

    def source_names(self) -> list[str]:
        return list(self.names)

    def load_split(self, name: str, split: str, source_index: int) -> FolderClipDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        rows = [
            (v, lab)
            for v, lab in self.rows["test" if split == "test" else "train"]
            if self._source_of.get(v) == name
        ]
        if split != "test":
            which = hash_split(
                [v for v, _ in rows], {"val": self.val_fraction}, salt=f"dfew-val-{self.fold}"
            )
            rows = [r for r, w in zip(rows, which, strict=True) if w == split]
        entries = [(self.clips_dir / v, lab) for v, lab in rows]
        return FolderClipDataset(entries, source_index, train=split == "train", **self.options)
