"""FERV39k in its official layout, registered as dataset ``ferv39k`` (docs/datasets.md).

    <root>/2_ClipsforFaceCrop/<Scene>/<Emotion>/<id>/*.jpg   (face-cropped frames)
    <root>/4_setups/All_scenes/train_All.csv, test_All.csv    (no header, space separated lines
                                                               `<Scene>/<Emotion>/<id> <Emotion>`)

Classes are mapped by *name* into the DFEW order (codebases disagree on FERV39k's order). Sources
are its scenes (`sources_by: scene`), its scenarios (`scenario`) or the whole set (`whole`); there
is no official validation split, so a deterministic `val_fraction` of each source's training
clips is held back. Config keys (``simulations/conf/data/ferv39k.yaml``): root, sources_by,
scenarios, sources, val_fraction, num_frames, size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hdf.classes import label_from_name
from hdf.data.folder_dataset import FolderClipDataset, clip_options, hash_split, select_sources
from hdf.data.source import SPLITS, SourceSet, register_dataset

log = logging.getLogger(__name__)

# The 22 scene folders of the release, the order giving each scene's source index.
SCENES: tuple[str, ...] = (
    "Action", "Argue", "Business", "Conflict", "Contest", "Crime", "Crisis", "DailyLife",
    "ElegantArt", "Experiment", "History", "Interview", "Liveshow", "Medicine", "OfficialEvent",
    "ScholarReport", "School", "Social", "Speech", "Talkshow", "Terror", "War",
)  # fmt: skip

# The paper groups the 22 scenes into 4 scenarios but its accessible text gives no table, so this
# grouping is OUR reading of the FERV39k paper (Wang et al., CVPR 2022), not an official file.
# Override it with the config key `scenarios` (a mapping scenario name -> list of scenes).
SCENARIOS: dict[str, tuple[str, ...]] = {
    "daily_life": ("DailyLife", "School", "Social", "Business", "Medicine", "Experiment"),
    "weak_interactive_shows": (
        "Interview",
        "Talkshow",
        "Speech",
        "Liveshow",
        "OfficialEvent",
        "ScholarReport",
        "ElegantArt",
    ),
    "strong_interactive_activities": ("Argue", "Conflict", "Contest", "Action"),
    "anomalous_issues": ("Crime", "Crisis", "Terror", "War", "History"),
}
MODES = ("scene", "scenario", "whole")


def _read_setup(path: Path) -> list[tuple[str, str, int]]:
    """(relative clip path, scene, label) per line of a FERV39k setup file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"FERV39k split file {path} not found; expected 4_setups/All_scenes/"
            f"{{train,test}}_All.csv under data.root"
        )
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or fields[0].count("/") < 2:
                raise ValueError(
                    f"{path}:{line_no}: expected '<Scene>/<Emotion>/<id> <Emotion>' "
                    f"(space separated, no header), got {line.strip()!r}"
                )
            try:
                label = label_from_name(fields[1])
            except ValueError as err:
                raise ValueError(f"{path}:{line_no}: {err}") from None
            rel = fields[0].strip("/")
            rows.append((rel, rel.split("/")[0], label))
    return rows


@register_dataset("ferv39k")
class FERV39kSources(SourceSet):
    """FERV39k's official All_scenes split, with scenes or scenarios as sources."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.options = clip_options(cfg)
        root = Path(str(cfg["root"])).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"FERV39k root {root} does not exist; expected a folder holding "
                f"2_ClipsforFaceCrop/ and 4_setups/All_scenes/ (set data.root)"
            )
        self.clips_dir = root / "2_ClipsforFaceCrop"
        if not self.clips_dir.is_dir():
            raise FileNotFoundError(
                f"FERV39k frame folder {self.clips_dir} not found; expected "
                f"2_ClipsforFaceCrop/<Scene>/<Emotion>/<id>/ under data.root"
            )
        setups = root / "4_setups" / "All_scenes"
        self.rows = {s: _read_setup(setups / f"{s}_All.csv") for s in ("train", "test")}
        self.val_fraction = float(cfg["val_fraction"])

        present = {scene for rows in self.rows.values() for _, scene, _ in rows}
        extra = sorted(present - set(SCENES))
        if extra:
            log.warning("FERV39k split files name scene(s) outside the 22 known: %s", extra)
        scenes = [s for s in SCENES if s in present] + extra

        self.mode = str(cfg["sources_by"])
        if self.mode == "scene":
            self._group = {s: s for s in scenes}
            names = scenes
        elif self.mode == "scenario":
            groups = cfg["scenarios"] or SCENARIOS
            self._group = {}
            for scenario, members in groups.items():
                for scene in members:
                    if scene in self._group:
                        raise ValueError(
                            f"scene {scene!r} is in two scenarios in data.scenarios: "
                            f"{self._group[scene]!r} and {scenario!r}"
                        )
                    self._group[str(scene)] = str(scenario)
            unmapped = [s for s in scenes if s not in self._group]
            if unmapped:
                log.warning("FERV39k scene(s) %s belong to no scenario; left out", unmapped)
            names = [str(g) for g in groups if any(self._group.get(s) == g for s in scenes)]
        elif self.mode == "whole":
            self._group = {s: "ferv39k" for s in scenes}
            names = ["ferv39k"]
        else:
            raise ValueError(f"unknown data.sources_by {self.mode!r}; expected one of {MODES}")
        self.names = select_sources(names, cfg["sources"])

    def source_names(self) -> list[str]:
        return list(self.names)

    def load_split(self, name: str, split: str, source_index: int) -> FolderClipDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        rows = [
            (rel, lab)
            for rel, scene, lab in self.rows["test" if split == "test" else "train"]
            if self._group.get(scene) == name
        ]
        if split != "test":
            which = hash_split([r for r, _ in rows], {"val": self.val_fraction}, "ferv39k-val")
            rows = [r for r, w in zip(rows, which, strict=True) if w == split]
        entries = [(self.clips_dir / rel, lab) for rel, lab in rows]
        return FolderClipDataset(entries, source_index, train=split == "train", **self.options)
