"""Expressions along a video: per window of T frames, the face box and each class's probability.

    python -m simulations.predict clip.mp4 runs/<folder>
    python -m simulations.predict frames/ runs/<folder>/checkpoint.pt --stride 2 --fps 25 \
        --csv out.csv --json out.json --strip out.png

Frames come from a video file (PyAV: mp4, mov, avi, ...) or a folder of frame images. Faces are
found and judged by `hdf.data.faces.FacePolicy`, the rule `simulations.prepare` applies to training
clips: a window of T frames is classified when at least ``--min-face-frac`` of its frames, and at
least ``--min-face-frames``, show a face; then all its frames are cropped with one box (the median
of that window's detections, so the crop does not jitter) by `hdf.data.faces.crop_face`, as
training clips are. Other windows are reported as ``no-face``.
Windows start every ``--stride`` frames (default T); a last window is added to reach the final
frame, and a video shorter than T gives one window with frames repeated.
Exit codes: 0 (also when no face is found); 2, with one line on stderr naming the file or option,
for an unreadable video, frame folder or checkpoint, a checkpoint that does not fit its config, or
no face detector in the installed OpenCV.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from hdf.checkpoint import load_model
from hdf.classes import EMOTIONS
from hdf.data.faces import Box, FacePolicy, crop_face, detect_face, scale_box
from hdf.data.frames import ClipReadError, is_video, open_frames
from hdf.data.frames import sample_indices as uniform_indices
from hdf.device import resolve_device
from hdf.models import HDFNet
from hdf.runfolder.folder import clean
from simulations import cli
from simulations.prepare import add_policy_arguments, policy_from

THUMB_HEIGHT = 120  # strip thumbnails
BATCH = 16  # windows per forward pass


@dataclass
class Window:
    """One window of T frames and what the model made of it."""

    index: int
    start: int  # first frame (inclusive)
    end: int  # last frame (inclusive)
    face_frames: int
    box: Box | None  # in the original frame's pixels; None = no-face
    probs: np.ndarray | None = None
    thumb: Image.Image | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        return "ok" if self.box is not None else "no-face"

    @property
    def label(self) -> str | None:
        return None if self.probs is None else EMOTIONS[int(np.argmax(self.probs))]


@dataclass
class Prediction:
    """Everything `predict` learned about one input."""

    path: Path
    fps: float | None
    num_frames: int  # frames read
    window_frames: int  # T
    stride: int
    windows: list[Window]
    face_boxes: list[Box | None]  # per frame, original pixels
    error: str | None = None  # decoding stopped early (the frames before it are kept)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per window (the CSV; also the JSON's ``windows``)."""
        out = []
        for w in self.windows:
            row: dict[str, Any] = {
                "window": w.index,
                "start_frame": w.start,
                "end_frame": w.end,
                "start_s": None if not self.fps else round(w.start / self.fps, 3),
                "end_s": None if not self.fps else round((w.end + 1) / self.fps, 3),
                "face_frames": w.face_frames,
                "status": w.status,
                "box_x": None if w.box is None else w.box[0],
                "box_y": None if w.box is None else w.box[1],
                "box_w": None if w.box is None else w.box[2],
                "box_h": None if w.box is None else w.box[3],
                "prediction": w.label,
            }
            for i, e in enumerate(EMOTIONS):
                row[f"p_{e}"] = None if w.probs is None else round(float(w.probs[i]), 6)
            out.append(row)
        return out

    def to_json(self, checkpoint: str) -> dict[str, Any]:
        return {
            "input": str(self.path),
            "checkpoint": checkpoint,
            "frames": self.num_frames,
            "fps": self.fps,
            "window_frames": self.window_frames,
            "stride": self.stride,
            "classes": list(EMOTIONS),
            "windows": self.rows(),
            "frames_without_face": [i for i, b in enumerate(self.face_boxes) if b is None],
            "error": self.error,
        }


# ---- windows ---------------------------------------------------------------------------------


def window_box(boxes: list[Box | None], policy: FacePolicy) -> Box | None:
    """The median box of a window's detections; None when the policy finds too few of them."""
    found = [b for b in boxes if b is not None]
    if not policy.enough(len(found), len(boxes)):
        return None
    return tuple(round(float(v)) for v in np.median(np.asarray(found), axis=0))  # type: ignore[return-value]


def _thumb(frame: np.ndarray, box: Box | None) -> Image.Image:
    """A small copy of `frame` with the window's box drawn (work-frame pixels)."""
    img = Image.fromarray(frame)
    if box is not None:
        x, y, w, h = box
        ImageDraw.Draw(img).rectangle([x, y, x + w, y + h], outline=(40, 220, 60), width=3)
    scale = THUMB_HEIGHT / img.height
    return img.resize((max(1, round(img.width * scale)), THUMB_HEIGHT))


@torch.no_grad()
def _classify(model: HDFNet, clips: list[np.ndarray], device: torch.device) -> np.ndarray:
    """Class probabilities for uint8 clips T x H x W x 3."""
    x = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).contiguous().to(device)
    logits, _ = model(model.preprocess(x))
    return logits.float().softmax(dim=1).cpu().numpy()


def predict(
    path: str | Path,
    model: HDFNet,
    *,
    stride: int | None = None,
    policy: FacePolicy | None = None,
    device: torch.device | None = None,
    strip: bool = False,
    console: Console | None = None,
) -> Prediction:
    """Detect, crop and classify every window of `model.num_frames` frames of one input.

    Frames stream through a buffer of T frames, so memory does not grow with the video's length.
    Raises `ClipReadError` when nothing at all can be read; a decoding error after some frames is
    kept in `Prediction.error` with the windows of the frames read before it.
    """
    path = Path(path)
    device = device or torch.device("cpu")
    t = model.num_frames
    stride = int(stride or t)
    if stride < 1:
        raise ValueError(f"--stride must be at least 1, got {stride}")
    policy = policy or FacePolicy()
    frames, fps, count = open_frames(path)

    buffer: deque[tuple[int, np.ndarray, float]] = deque(maxlen=t)  # (index, work frame, factor)
    work_boxes: list[Box | None] = []  # per frame, in work-frame pixels
    scale: list[float] = []
    windows: list[Window] = []
    pending: list[tuple[Window, np.ndarray]] = []
    error: str | None = None

    def flush() -> None:
        if pending:
            probs = _classify(model, [c for _, c in pending], device)
            for (w, _), p in zip(pending, probs, strict=True):
                w.probs = p
            pending.clear()

    def emit(indices: list[int]) -> None:
        by_index = {i: (f, s) for i, f, s in buffer}
        boxes = [work_boxes[i] for i in indices]
        box = window_box(boxes, policy)
        mid = by_index[indices[len(indices) // 2]][0]
        w = Window(
            index=len(windows),
            start=indices[0],
            end=indices[-1],
            face_frames=len({i for i in indices if work_boxes[i] is not None}),
            box=scale_box(box, by_index[indices[0]][1]),
            thumb=_thumb(mid, box) if strip else None,
        )
        windows.append(w)
        if box is not None:
            clip = np.stack([crop_face(by_index[i][0], box, size=model.size) for i in indices])
            pending.append((w, clip))
            if len(pending) >= BATCH:
                flush()

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    n = 0
    console = console or cli.console(stderr=True)
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"reading {path.name}", total=count)
        try:
            for frame in frames:
                work, f, found = policy.detect(frame, detect_face)
                work_boxes.append(found)
                scale.append(f)
                buffer.append((n, work, f))
                if n >= t - 1 and (n - (t - 1)) % stride == 0:
                    emit(list(range(n - t + 1, n + 1)))
                n += 1
                progress.advance(task)
        except ClipReadError as err:
            if n == 0:
                raise
            error = f"decoding stopped after {n} frames: {err}"
        if n == 0:
            raise ClipReadError(path, "no frames could be read")
        if n < t:  # one window, frames repeated in order (as clips are sampled for training)
            emit([int(i) for i in uniform_indices(n, t, train=False)])
        elif not windows or windows[-1].end < n - 1:
            emit(list(range(n - t, n)))
        flush()
    face_boxes = [scale_box(b, s) for b, s in zip(work_boxes, scale, strict=True)]
    return Prediction(path, fps, n, t, stride, windows, face_boxes, error)


# ---- output ----------------------------------------------------------------------------------


def write_csv(pred: Prediction, out: Path) -> None:
    rows = pred.rows()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["window"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in r.items()})


def write_strip(pred: Prediction, out: Path, max_windows: int = 24, per_row: int = 8) -> None:
    """Window thumbnails (middle frame, box, top class) side by side; at most `max_windows`."""
    wins = [w for w in pred.windows if w.thumb is not None]
    if len(wins) > max_windows:
        wins = [wins[int(i)] for i in np.linspace(0, len(wins) - 1, max_windows).round()]
    if not wins:
        return
    tw = max(w.thumb.width for w in wins)  # type: ignore[union-attr]
    text_h = 28
    rows = (len(wins) + per_row - 1) // per_row
    cols = min(per_row, len(wins))
    sheet = Image.new("RGB", (cols * tw, rows * (THUMB_HEIGHT + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, w in enumerate(wins):
        x, y = (k % per_row) * tw, (k // per_row) * (THUMB_HEIGHT + text_h)
        sheet.paste(w.thumb, (x, y))  # type: ignore[arg-type]
        span = f"#{w.index} f{w.start}-{w.end}"
        if w.probs is None:
            text, colour = "no face", (200, 30, 30)
        else:
            text, colour = f"{w.label} {100 * float(w.probs.max()):.0f}%", (20, 20, 20)
        draw.text((x + 3, y + THUMB_HEIGHT + 2), span, fill=(90, 90, 90))
        draw.text((x + 3, y + THUMB_HEIGHT + 14), text, fill=colour)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def show(pred: Prediction, console: Console) -> None:
    """The rich table: one row per window, probabilities in percent."""
    table = Table(title=f"{pred.path.name}: {pred.num_frames} frames, T={pred.window_frames}")
    cols = ["#", "frames", "time (s)", "faces", "box x,y,w,h", "expression", *EMOTIONS]
    for c in cols:
        table.add_column(c, justify="right" if c not in ("expression", "box x,y,w,h") else "left")
    for r, w in zip(pred.rows(), pred.windows, strict=True):
        time = "-" if r["start_s"] is None else f"{r['start_s']:.2f}-{r['end_s']:.2f}"
        box = "-" if w.box is None else ",".join(str(v) for v in w.box)
        probs = (
            ["-"] * len(EMOTIONS) if w.probs is None else [f"{100 * float(p):.1f}" for p in w.probs]
        )
        label = w.label or "[red]no face[/]"
        table.add_row(
            str(w.index), f"{w.start}-{w.end}", time, f"{w.face_frames}/{pred.window_frames}",
            box, label, *probs,
        )  # fmt: skip
    console.print(table)


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.predict",
        description="Expression probabilities for each window of T frames of a video.",
    )
    parser.add_argument("input", help="video file (mp4, mov, avi, ...) or folder of frame images")
    parser.add_argument("checkpoint", help="run folder (runs/<folder>) or checkpoint file")
    parser.add_argument("--stride", type=int, default=None, help="frames between windows (T)")
    add_policy_arguments(parser)
    parser.add_argument("--fps", type=float, default=None, help="frame rate of a frame folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--csv", type=Path, default=None, help="write one row per window")
    parser.add_argument("--json", type=Path, default=None, help="write windows and frame boxes")
    parser.add_argument("--strip", type=Path, default=None, help="write an annotated PNG strip")
    args = parser.parse_args(argv)
    console, err_console = cli.console(), cli.console(stderr=True)
    src = Path(args.input)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such video file or frame folder")
    if src.is_file() and not is_video(src):
        raise ValueError(f"{src}: not a video file (mp4, mov, avi, ...) nor a frame folder")
    try:
        device = resolve_device(args.device)
    except RuntimeError as err:  # e.g. --device cuda on a machine without CUDA
        raise ValueError(f"--device {args.device}: {err}") from None
    model, _ = load_model(args.checkpoint, device=device)
    pred = predict(
        src,
        model,
        stride=args.stride,
        policy=policy_from(args),
        device=device,
        strip=args.strip is not None,
        console=err_console,
    )
    if args.fps and pred.fps is None:
        pred.fps = float(args.fps)

    show(pred, console)
    if args.csv:
        write_csv(pred, args.csv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(clean(pred.to_json(str(args.checkpoint))), indent=1))
    if args.strip:
        write_strip(pred, args.strip)
    no_face = sum(b is None for b in pred.face_boxes)
    classified = sum(w.probs is not None for w in pred.windows)
    if pred.error:
        cli.print_error(f"{src}: {pred.error}; the windows above cover the frames read")
        return cli.EXIT_USER_ERROR
    if no_face == pred.num_frames:
        console.print(
            f"no face found in any of the {pred.num_frames} frames of {src}: nothing classified"
        )
        return 0
    console.print(
        f"{classified} of {len(pred.windows)} windows classified; "
        f"{no_face} of {pred.num_frames} frames without a face"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
