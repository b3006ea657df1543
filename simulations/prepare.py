"""Turn a folder of raw videos into face-cropped frame clips and a manifest for ``data=manifest``.

    python -m simulations.prepare RAW_VIDEO_DIR OUT_DIR [--size 112] [--every N] [--labels CSV]

Labels come from each video's first sub-folder (`RAW/happy/clip1.mp4`; any name or alias that
`hdf.classes.label_from_name` knows) or from `--labels CSV` (columns `path,label[,source]`, path
relative to RAW_VIDEO_DIR). Each kept frame's largest face (OpenCV's bundled Haar cascade) is
cropped with a margin and written as `OUT_DIR/clips/<video path>/00001.jpg ...`; frames without a
face are skipped and counted, videos with no face frame left out. The last line printed is the
manifest's path, `OUT_DIR/manifest.csv`.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from hdf.classes import EMOTIONS, label_from_name
from hdf.data.faces import Box, FaceDetectorUnavailable, crop_face, detect_face
from hdf.data.frames import VIDEO_EXTS, ClipReadError, iter_video_frames


@dataclass
class Summary:
    """What a prepare run did, for the printed table and for tests."""

    videos: int = 0
    clips: int = 0
    frames_kept: int = 0
    frames_no_face: int = 0
    clips_no_face: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    manifest: Path | None = None


def _labels_from_csv(raw: Path, path: Path) -> dict[str, tuple[str, str | None]]:
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} not found (columns path,label[,source])")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if "path" not in header or "label" not in header:
            raise ValueError(f"{path}: expected columns path,label[,source], found {header}")
        out = {}
        for line, row in enumerate(reader, 2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            try:
                label_from_name(row["label"])
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            rel = Path(row["path"])
            key = str(rel.relative_to(raw) if rel.is_absolute() else rel)
            out[key] = (row["label"], row.get("source") or None)
    return out


def find_videos(raw: Path, labels_csv: Path | None) -> list[tuple[Path, str, str | None]]:
    """(video, label name, source or None) for every video under `raw`, labels checked."""
    if not raw.is_dir():
        raise FileNotFoundError(f"raw video folder {raw} does not exist")
    table = _labels_from_csv(raw, labels_csv) if labels_csv else None
    found = []
    for video in sorted(p for p in raw.rglob("*") if p.suffix.lower() in VIDEO_EXTS):
        rel = video.relative_to(raw)
        if table is not None:
            if str(rel) not in table:
                continue  # a video the CSV does not list is not part of the dataset
            label, source = table[str(rel)]
        elif len(rel.parts) >= 2:
            label, source = rel.parts[0], None
            try:
                label_from_name(label)
            except ValueError as err:
                raise ValueError(f"{video}: its folder {label!r} is not a label: {err}") from None
        else:
            raise ValueError(
                f"{video} has no label: put videos in <label>/ sub-folders "
                f"({', '.join(EMOTIONS)}) or pass --labels CSV"
            )
        found.append((video, label, source))
    return found


def prepare(
    raw: Path,
    out: Path,
    *,
    size: int = 112,
    every: int = 1,
    margin: float = 0.25,
    labels_csv: Path | None = None,
    detector: Callable[[np.ndarray], Box | None] = detect_face,
) -> Summary:
    """Crop every video's faces into frame folders under `out` and write `out/manifest.csv`."""
    if every < 1 or size < 8:
        raise ValueError(f"--every must be >= 1 and --size >= 8, got {every} and {size}")
    videos = find_videos(raw, labels_csv)
    summary = Summary(videos=len(videos))
    rows: list[dict[str, str]] = []
    for video, label, source in videos:
        rel = video.relative_to(raw).with_suffix("")
        clip_dir = out / "clips" / rel
        if clip_dir.exists():
            shutil.rmtree(clip_dir)  # a rerun replaces the clip, never mixes old frames in
        kept = no_face = 0
        try:
            for frame in iter_video_frames(video, every=every):
                box = detector(frame)
                if box is None:
                    no_face += 1
                    continue
                kept += 1
                clip_dir.mkdir(parents=True, exist_ok=True)
                crop = crop_face(frame, box, margin=margin, size=size)
                Image.fromarray(crop).save(clip_dir / f"{kept:05d}.jpg", quality=95)
        except ClipReadError as err:
            summary.unreadable.append(f"{err}")
            if clip_dir.exists():
                shutil.rmtree(clip_dir)
            continue
        summary.frames_kept += kept
        summary.frames_no_face += no_face
        if kept == 0:
            summary.clips_no_face.append(str(video))
            continue
        summary.clips += 1
        row = {"path": (Path("clips") / rel).as_posix(), "label": label}
        if source is not None:
            row["source"] = source
        rows.append(row)

    out.mkdir(parents=True, exist_ok=True)
    summary.manifest = out / "manifest.csv"
    columns = ["path", "label"] + (["source"] if any("source" in r for r in rows) else [])
    with summary.manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return summary


def _print_summary(summary: Summary, console: Console) -> None:
    table = Table(title="prepare: face-cropped clips")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("videos found", str(summary.videos))
    table.add_row("clips written", str(summary.clips))
    table.add_row("frames kept (face found)", str(summary.frames_kept))
    table.add_row("frames skipped (no face)", str(summary.frames_no_face))
    table.add_row("videos left out (no face in any frame)", str(len(summary.clips_no_face)))
    table.add_row("videos unreadable", str(len(summary.unreadable)))
    console.print(table)
    for what in summary.unreadable:
        console.print(f"[yellow]unreadable:[/] {what}")
    for what in summary.clips_no_face:
        console.print(f"[yellow]no face:[/] {what}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 when at least one clip was written)."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("raw", type=Path, help="folder of raw videos (<label>/ subfolders)")
    parser.add_argument("out", type=Path, help="output folder (clips/ and manifest.csv)")
    parser.add_argument("--size", type=int, default=112, help="side of the square face crops")
    parser.add_argument("--every", type=int, default=1, help="keep every N-th frame")
    parser.add_argument("--margin", type=float, default=0.25, help="crop margin per side, x box")
    parser.add_argument("--labels", type=Path, default=None, help="CSV path,label[,source]")
    args = parser.parse_args(argv)
    console = Console()
    try:
        summary = prepare(
            args.raw,
            args.out,
            size=args.size,
            every=args.every,
            margin=args.margin,
            labels_csv=args.labels,
        )
    except (FileNotFoundError, ValueError, FaceDetectorUnavailable) as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    _print_summary(summary, console)
    if summary.clips == 0:
        console.print("[red]no clip written:[/] no face found in any video")
    print(summary.manifest)
    return 0 if summary.clips else 1


if __name__ == "__main__":
    sys.exit(main())
