"""Tiny fixture trees in the exact DFEW and FERV39k layouts, a PyAV-encoded mp4, a drawn face.

Each frame encodes what it is: red = the clip's code (so a test can tell which clip came back and
check its label), green = 8 x the frame index (so a test can tell which frames were sampled).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FRAME = 32  # fixture frame side (the loaders resize to the config's size)


def frame_array(code: int, index: int, side: int = FRAME) -> np.ndarray:
    img = np.zeros((side, side, 3), dtype=np.uint8)
    img[..., 0] = code
    img[..., 1] = min(8 * index, 255)
    img[..., 2] = 128
    return img


def write_frames(folder: Path, code: int, n: int, name: str = "{i:05d}.jpg") -> Path:
    """`n` JPEG frames named by `name` (format keys: i = 1-based frame number, clip = folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / name.format(i=i + 1, clip=folder.name)
        Image.fromarray(frame_array(code, i)).save(path, quality=95)
    return folder


def write_mp4(path: Path, frames: Sequence[np.ndarray], fps: int = 10) -> Path:
    """A real encoded mp4 (MPEG-4 part 2, yuv420p) from RGB frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---- DFEW ---------------------------------------------------------------------------------------


def make_dfew(
    root: Path,
    n_clips: int = 20,
    frames: int = 12,
    split_dir: str = "{split}(single-labeled)",
    variant: str = "clip_224x224",
) -> dict[str, int]:
    """DFEW tree with clip ids 1..n_clips; label (1-based) = 1 + id % 7; fold k tests id % 5 == k-1.

    Returns {5-digit clip id: 0-based label}. Frames are named `<clip>_<frame>.jpg` as in DFEW.
    """
    labels = {}
    for cid in range(1, n_clips + 1):
        name = f"{cid:05d}"
        write_frames(
            root / "Clip" / variant / name, code=cid * 10, n=frames, name="{clip}_{i:05d}.jpg"
        )
        labels[name] = cid % 7
    for fold in range(1, 6):
        for split in ("train", "test"):
            folder = root / "EmoLabel_DataSplit" / split_dir.format(split=split)
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / f"set_{fold}.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["video_name", "label"])
                for cid in range(1, n_clips + 1):
                    if (cid % 5 == fold - 1) == (split == "test"):
                        w.writerow([cid, 1 + cid % 7])  # int id, 1-based label, as released
    return labels


# ---- FERV39k ------------------------------------------------------------------------------------

FERV_EMOTIONS = ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear")


def make_ferv39k(
    root: Path, scenes: Sequence[str] = ("Action", "Crime", "DailyLife", "Interview")
) -> list[tuple[str, str, str]]:
    """FERV39k tree: per scene, one clip per emotion in train and two emotions in test.

    Returns (relative path, emotion name, split) per clip.
    """
    rows = []
    code = 1
    for scene in scenes:
        for k, emotion in enumerate(FERV_EMOTIONS):
            for split in ("train", "test") if k < 2 else ("train",):
                rel = f"{scene}/{emotion}/{code:04d}"
                write_frames(root / "2_ClipsforFaceCrop" / rel, code=code * 3 % 256, n=5 + k)
                rows.append((rel, emotion, split))
                code += 1
    setups = root / "4_setups" / "All_scenes"
    setups.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = [f"{rel} {emo}\n" for rel, emo, s in rows if s == split]
        (setups / f"{split}_All.csv").write_text("".join(lines))
    return rows


# ---- a face OpenCV's Haar cascade finds --------------------------------------------------------


def drawn_face(side: int = 160, scale: float = 1.0, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A blurred cartoon face (skin oval, hair, brows, eyes, nose, mouth) on a dark background."""
    img = Image.new("RGB", (side, side), (40, 60, 90))
    d = ImageDraw.Draw(img)
    cx0, cy0 = side / 2 + shift[0], side / 2 + shift[1]

    def ellipse(cx: float, cy: float, rx: float, ry: float, col: tuple[int, int, int]) -> None:
        s = scale * side / 160
        d.ellipse(
            [cx0 + (cx - rx) * s, cy0 + (cy - ry) * s, cx0 + (cx + rx) * s, cy0 + (cy + ry) * s],
            fill=col,
        )

    ellipse(0, 0, 38, 50, (215, 175, 145))
    ellipse(0, -52, 40, 18, (50, 35, 25))
    for x in (-15, 15):
        ellipse(x, -14, 10, 3, (70, 50, 40))
        ellipse(x, -4, 8, 5, (250, 250, 250))
        ellipse(x, -4, 4, 4, (30, 20, 20))
    ellipse(0, 10, 4, 10, (195, 150, 125))
    ellipse(-4, 18, 3, 2, (120, 80, 70))
    ellipse(4, 18, 3, 2, (120, 80, 70))
    ellipse(0, 30, 14, 5, (150, 60, 60))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)))


def blank(side: int = 160) -> np.ndarray:
    return np.full((side, side, 3), (40, 60, 90), dtype=np.uint8)
