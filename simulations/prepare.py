"""Turn a folder of raw videos into face-cropped frame clips and a manifest for ``data=manifest``.

    python -m simulations.prepare RAW_VIDEO_DIR OUT_DIR [--size 112] [--every N] [--labels CSV]

Labels come from each video's first sub-folder (`RAW/happy/clip1.mp4`; any name or alias that
`hdf.classes.label_from_name` knows) or from `--labels CSV` (columns `path,label[,source]`, path
relative to RAW_VIDEO_DIR). Each frame's largest face (OpenCV's bundled Haar cascade) is cropped
with a margin and written as `OUT_DIR/clips/<video path>/00001.jpg ...`; frames without a face are
skipped and counted. Faces are found and judged by `hdf.data.faces.FacePolicy`, the rule
`simulations.predict` applies too: a video of n frames (every N-th) is written as a clip only when
at least max(ceil(--min-face-frac x n), --min-face-frames) of them show a face (defaults 0.5 and 3);
a video with fewer (no face, or a few false detections on lettering or texture) is left out and
counted. `OUT_DIR/contact_sheet.png` shows sampled crops of every clip written (at most
--sheet-clips rows), so a site can look at what it will train on. The last line printed is the
manifest's path, `OUT_DIR/manifest.csv`; when no clip is written, the command fails (exit 2).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from hdf.classes import EMOTIONS, label_from_name
from hdf.data.faces import Detector, FacePolicy, crop_face, detect_face, scale_box
from hdf.data.frames import VIDEO_EXTS, ClipReadError, iter_video_frames, list_frames
from simulations import cli

SHEET_FILE = "contact_sheet.png"
SHEET_CLIPS = 100  # clips (rows) on the contact sheet at most
SHEET_FRAMES = 6  # crops per clip on the sheet
THUMB = 64  # side of a crop on the sheet


@dataclass
class Summary:
    """What a prepare run did, for the printed table and for tests."""

    videos: int = 0
    clips: int = 0
    frames_kept: int = 0
    frames_no_face: int = 0
    # video -> (face frames, frames read) for videos left out by the face policy
    left_out: dict[str, tuple[int, int]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    manifest: Path | None = None
    contact_sheet: Path | None = None


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
    policy: FacePolicy | None = None,
    detector: Detector | None = None,
    sheet_clips: int = SHEET_CLIPS,
) -> Summary:
    """Crop every video's faces into frame folders under `out`; write the manifest and the sheet.

    A video whose face frames fall short of `policy` (see `FacePolicy`) is left out and counted
    in `Summary.left_out`; its frames are not kept.
    """
    if every < 1 or size < 8:
        raise ValueError(f"--every must be >= 1 and --size >= 8, got {every} and {size}")
    policy = policy or FacePolicy()
    detector = detector or detect_face
    videos = find_videos(raw, labels_csv)
    summary = Summary(videos=len(videos))
    rows: list[dict[str, str]] = []
    for video, label, source in videos:
        rel = video.relative_to(raw).with_suffix("")
        clip_dir = out / "clips" / rel
        if clip_dir.exists():
            shutil.rmtree(clip_dir)  # a rerun replaces the clip, never mixes old frames in
        kept = frames = 0
        try:
            for frame in iter_video_frames(video, every=every):
                frames += 1
                _, f, box = policy.detect(frame, detector)
                if box is None:
                    continue
                kept += 1
                clip_dir.mkdir(parents=True, exist_ok=True)
                crop = crop_face(frame, scale_box(box, f), margin=margin, size=size)  # type: ignore[arg-type]
                Image.fromarray(crop).save(clip_dir / f"{kept:05d}.jpg", quality=95)
        except ClipReadError as err:
            summary.unreadable.append(f"{err}")
            _remove_clip(clip_dir, out / "clips")
            continue
        if not policy.enough(kept, frames):
            summary.left_out[str(video)] = (kept, frames)
            summary.frames_no_face += frames
            _remove_clip(clip_dir, out / "clips")
            continue
        summary.frames_kept += kept
        summary.frames_no_face += frames - kept
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
    sheet = out / SHEET_FILE
    sheet.unlink(missing_ok=True)  # never leave a previous run's sheet beside a new manifest
    if rows:
        summary.contact_sheet = write_contact_sheet(out, rows, sheet, sheet_clips)
    return summary


def _remove_clip(clip_dir: Path, root: Path) -> None:
    """Delete a clip's frames and the folders above it that it leaves empty, up to `root`."""
    shutil.rmtree(clip_dir, ignore_errors=True)
    for parent in clip_dir.parents:
        if parent == root or root not in parent.parents:
            break
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            break


def write_contact_sheet(
    out: Path, rows: list[dict[str, str]], path: Path, max_clips: int = SHEET_CLIPS
) -> Path:
    """A PNG with one row per clip (label, path, `SHEET_FRAMES` crops spread over the clip).

    At most `max_clips` rows, spread evenly over the manifest's clips (sorted by label), so a
    site can look at what it is about to train on without opening every folder.
    """
    rows = sorted(rows, key=lambda r: (r["label"], r["path"]))
    if len(rows) > max_clips:
        rows = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, max_clips).round()]
    label_w, gap = 240, 4
    sheet = Image.new(
        "RGB",
        (label_w + SHEET_FRAMES * (THUMB + gap), len(rows) * (THUMB + gap) + gap),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = gap + r * (THUMB + gap)
        draw.text((4, y + 4), row["label"], fill=(0, 0, 0))
        draw.text((4, y + 20), row["path"][-36:], fill=(90, 90, 90))
        frames = list_frames(out / row["path"])
        pick = np.linspace(0, len(frames) - 1, min(SHEET_FRAMES, len(frames))).round()
        for c, i in enumerate(pick.astype(int)):
            with Image.open(frames[i]) as img:
                thumb = img.convert("RGB").resize((THUMB, THUMB))
            sheet.paste(thumb, (label_w + c * (THUMB + gap), y))
    sheet.save(path)
    return path


def _print_summary(summary: Summary, console: Console, policy: FacePolicy) -> None:
    table = Table(title="prepare: face-cropped clips")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("videos found", str(summary.videos))
    table.add_row("clips written", str(summary.clips))
    table.add_row("frames kept (face found)", str(summary.frames_kept))
    table.add_row("frames skipped (no face, or in a left-out video)", str(summary.frames_no_face))
    table.add_row("videos left out (too few face frames)", str(len(summary.left_out)))
    table.add_row("videos unreadable", str(len(summary.unreadable)))
    console.print(table)
    for what in summary.unreadable:
        console.print(f"[yellow]unreadable:[/] {what}")
    for video, (faces, frames) in summary.left_out.items():
        console.print(
            f"[yellow]left out:[/] {video}: {faces} of {frames} frames show a face, "
            f"needs {policy.needed(frames)}"
        )
    if summary.contact_sheet is not None:
        console.print(f"contact sheet: {summary.contact_sheet}")


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The face-policy options, shared with `simulations.predict` (defaults: `FacePolicy`)."""
    default = FacePolicy()
    parser.add_argument(
        "--min-face-frac",
        type=float,
        default=default.min_face_frac,
        help="share of a clip's (predict: a window's) frames that must show a face",
    )
    parser.add_argument(
        "--min-face-frames",
        type=int,
        default=default.min_face_frames,
        help="and at least this many of its frames",
    )


def policy_from(args: argparse.Namespace) -> FacePolicy:
    return FacePolicy(min_face_frac=args.min_face_frac, min_face_frames=args.min_face_frames)


@cli.command
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
    parser.add_argument(
        "--sheet-clips", type=int, default=SHEET_CLIPS, help="clips shown on the contact sheet"
    )
    add_policy_arguments(parser)
    args = parser.parse_args(argv)
    policy = policy_from(args)
    summary = prepare(
        args.raw,
        args.out,
        size=args.size,
        every=args.every,
        margin=args.margin,
        labels_csv=args.labels,
        policy=policy,
        detector=detect_face,
        sheet_clips=max(1, args.sheet_clips),
    )
    _print_summary(summary, cli.console(), policy)
    if summary.clips == 0:
        raise ValueError(
            f"no clip written from the {summary.videos} video(s) under {args.raw}: none has "
            "enough face frames (see the list above); check the videos, or lower "
            "--min-face-frac / --min-face-frames"
        )
    print(summary.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
