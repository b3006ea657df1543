"""Face detection, the face policy and cropping shared by `simulations.prepare` and `predict`.

Uses OpenCV's bundled Haar frontal-face cascade (`cv2.data.haarcascades`, shipped in the
opencv-python(-headless) 4.x wheels). OpenCV 5 wheels no longer ship the cascades nor
`cv2.CascadeClassifier` (moved to opencv-contrib), so on OpenCV 5 `detect_face` raises
`FaceDetectorUnavailable` with the fix, unless a cascade XML is found in the Debian `opencv-data`
folders or given via the environment variable HDF_FACE_CASCADE and a contrib build is installed.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # x, y, width, height in pixels
Detector = Callable[..., "Box | None"]  # detect_face(frame, min_size) or a stand-in
CASCADE_FILE = "haarcascade_frontalface_default.xml"
_SYSTEM_DIRS = ("/usr/share/opencv4/haarcascades", "/usr/share/opencv/haarcascades")


class FaceDetectorUnavailable(RuntimeError):
    """No usable face detector in the installed OpenCV; the message says how to get one."""


def cascade_path() -> Path | None:
    """The frontal-face cascade XML: $HDF_FACE_CASCADE, OpenCV's bundled data, or Debian's."""
    candidates = []
    if os.environ.get("HDF_FACE_CASCADE"):
        candidates.append(Path(os.environ["HDF_FACE_CASCADE"]))
    try:
        import cv2

        candidates.append(Path(cv2.data.haarcascades) / CASCADE_FILE)
    except (ImportError, AttributeError):
        pass
    candidates += [Path(d) / CASCADE_FILE for d in _SYSTEM_DIRS]
    return next((p for p in candidates if p.is_file()), None)


@functools.lru_cache(maxsize=1)
def _detector() -> Any:
    """The loaded cascade (one per process; OpenCV objects do not pickle, so never shipped)."""
    try:
        import cv2
    except ImportError as err:
        raise FaceDetectorUnavailable(
            f"OpenCV is not importable ({err}); install opencv-python-headless>=4.9,<5"
        ) from None
    path = cascade_path()
    if path is None or not hasattr(cv2, "CascadeClassifier"):
        raise FaceDetectorUnavailable(
            f"OpenCV {cv2.__version__} has no bundled Haar face cascade (OpenCV 5 wheels dropped "
            f"cv2.CascadeClassifier and cv2/data/*.xml); install opencv-python-headless>=4.9,<5"
        )
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise FaceDetectorUnavailable(f"the face cascade {path} failed to load")
    return cascade


def detector_available() -> bool:
    try:
        _detector()
    except FaceDetectorUnavailable:
        return False
    return True


def detect_face(frame: np.ndarray, min_size: float = 0.1) -> Box | None:
    """The largest frontal face in an RGB (or gray) uint8 frame, or None when there is none.

    `min_size` is the smallest face side as a fraction of the frame's shorter side, which keeps
    the cascade from reporting texture-sized false positives.
    """
    import cv2

    gray = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    gray = cv2.equalizeHist(np.ascontiguousarray(gray))
    side = max(int(min(gray.shape[:2]) * min_size), 20)
    faces = _detector().detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side)
    )
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda b: int(b[2]) * int(b[3]))
    return int(x), int(y), int(w), int(h)


def crop_face(frame: np.ndarray, box: Box, margin: float = 0.25, size: int = 112) -> np.ndarray:
    """A square crop around `box`, widened by `margin` of its side on each edge, resized to size.

    The context around the face (forehead, chin) carries expression cues and absorbs detector
    jitter; where the square leaves the frame, the border pixels are repeated.
    """
    x, y, w, h = box
    side = round(max(w, h) * (1 + 2 * margin))
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    height, width = frame.shape[:2]
    pad = max(0, -x0, -y0, x0 + side - width, y0 + side - height)
    if pad:
        widths = ((pad, pad), (pad, pad)) + ((0, 0),) * (frame.ndim - 2)
        frame = np.pad(frame, widths, mode="edge")
        x0, y0 = x0 + pad, y0 + pad
    crop = frame[y0 : y0 + side, x0 : x0 + side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))


def downscale(frame: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """The frame with its shorter side at most `side`, and the factor back to the original."""
    h, w = frame.shape[:2]
    s = min(h, w)
    if s <= side:
        return frame, 1.0
    f = s / side
    img = Image.fromarray(frame).resize((round(w / f), round(h / f)), Image.Resampling.BILINEAR)
    return np.asarray(img), f


def scale_box(box: Box | None, f: float) -> Box | None:
    """A box found on a frame downscaled by `f`, in the original frame's pixels."""
    return (
        None
        if box is None
        else (round(box[0] * f), round(box[1] * f), round(box[2] * f), round(box[3] * f))
    )


@dataclass(frozen=True)
class FacePolicy:
    """Which frames show a face and when a clip has enough of them: one rule for both commands.

    `prepare` (what a site trains on) and `predict` (what a model is shown) apply the same rule,
    so a clip is trained on exactly when predict would classify it. Detection runs on the frame
    downscaled to `work_side` (speed; the cascade's result depends on the scale) and keeps the
    largest face at least `min_size` of the shorter side. A clip of n frames (prepare: the frames
    read from a video; predict: one window of T frames) needs at least
    ``max(ceil(min_face_frac * n), min_face_frames)`` face frames; fewer, and it is left out of
    the manifest (and counted) or reported as no-face. Sporadic false detections (texture, title
    lettering) are rarely half of a clip's frames, and a clip of one or two stray detections would
    be mostly repeated frames once sampled to T.
    """

    min_face_frac: float = 0.5  # share of a clip's frames that must show a face
    min_face_frames: int = 3  # and at least this many frames
    min_size: float = 0.1  # smallest face side, as a fraction of the frame's shorter side
    work_side: int = 480  # frames are downscaled to this shorter side before detection

    def __post_init__(self) -> None:
        if not 0 < self.min_face_frac <= 1:
            raise ValueError(f"--min-face-frac={self.min_face_frac}: give a share in (0, 1]")
        if self.min_face_frames < 1:
            raise ValueError(f"--min-face-frames={self.min_face_frames}: give at least 1")

    def needed(self, frames: int) -> int:
        """Face frames a clip of `frames` frames needs to be used."""
        return max(math.ceil(self.min_face_frac * frames), self.min_face_frames)

    def enough(self, face_frames: int, frames: int) -> bool:
        return face_frames >= self.needed(frames)

    def detect(
        self, frame: np.ndarray, detector: Detector = detect_face
    ) -> tuple[np.ndarray, float, Box | None]:
        """(the work frame, its factor back to the original, the face box on the work frame)."""
        work, f = downscale(frame, self.work_side)
        return work, f, detector(work, self.min_size)
