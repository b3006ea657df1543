"""A site's own clips listed in a CSV manifest, registered as dataset ``manifest``.

Columns: `path,label[,source][,split]`. `path` is a frame folder or a video file (mp4, mov, avi,
...), relative to the manifest's folder or absolute; `label` an emotion *name* (mapped by
`hdf.classes.label_from_name`); `source` names the clip's source (missing column: one source named
after the manifest file's stem); `split` is train, val or test (missing column: a deterministic
split by a hash of the path, with `val_fraction` and `test_fraction`). `python -m
simulations.prepare` writes such a manifest from raw videos.
Config keys (``simulations/conf/data/manifest.yaml``): manifest, val_fraction, test_fraction,
sources, num_frames, size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hdf.classes import label_from_name
from hdf.data.dfew import read_csv_columns
from hdf.data.folder_dataset import FolderClipDataset, clip_options, hash_split, select_sources
from hdf.data.source import SPLITS, SourceSet, register_dataset


@register_dataset("manifest")
class ManifestSources(SourceSet):
    """Sources and splits read from one manifest CSV."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.options = clip_options(cfg)
        path = Path(str(cfg["manifest"])).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"manifest {path} not found; expected a CSV with columns path,label[,source]"
                f"[,split] (set data.manifest; `python -m simulations.prepare` writes one)"
            )
        rows = read_csv_columns(path, ("path", "label"), "manifest")
        base = path.parent
        # (clip path, label, source, split or None, the path as written: the hash key)
        self.rows: list[tuple[Path, int, str, str | None, str]] = []
        for line, row in enumerate(rows, 2):
            if not row.get("path"):
                raise ValueError(f"{path}:{line}: empty path")
            try:
                label = label_from_name(row["label"])
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            split = (row.get("split") or "").lower() or None
            if split is not None and split not in SPLITS:
                raise ValueError(f"{path}:{line}: split {split!r} is not one of {SPLITS}")
            clip = Path(row["path"]).expanduser()
            source = row.get("source") or path.stem
            full = clip if clip.is_absolute() else base / clip
            self.rows.append((full, label, source, split, row["path"]))

        if not self.rows:
            raise ValueError(f"manifest {path} lists no clips")
        fractions = {
            "val": float(cfg["val_fraction"]),
            "test": float(cfg["test_fraction"]),
        }
        # Rows without a split get one per source, ranked by a hash of their path (no seed).
        self.splits: list[str] = [r[3] or "" for r in self.rows]
        names = sorted({r[2] for r in self.rows})
        for name in names:
            todo = [i for i, r in enumerate(self.rows) if r[2] == name and r[3] is None]
            keys = [self.rows[i][4] for i in todo]
            for i, s in zip(todo, hash_split(keys, fractions, "manifest"), strict=True):
                self.splits[i] = s
        self.names = select_sources(names, cfg["sources"])
        self.path = path

    def source_names(self) -> list[str]:
        return list(self.names)

    def load_split(self, name: str, split: str, source_index: int) -> FolderClipDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        entries = [
            (clip, label)
            for (clip, label, src, _, _), s in zip(self.rows, self.splits, strict=True)
            if src == name and s == split
        ]
        return FolderClipDataset(entries, source_index, train=split == "train", **self.options)
