"""Reading frames from disk: a folder of frame images or a video file.

`read_clip` samples one clip to T frames, uint8 T x 3 x size x size (the clip contract);
`open_frames` streams every frame of a whole video or folder at its own size (prediction along a
video). Every reader raises `ClipReadError`, never a library-specific exception, when a frame or a
video cannot be decoded, so the dataset can skip the clip, count it and report its path, and a
command can name the file (docs/design.md §6). PyAV and PIL are imported by the readers that use
them: a site with in-memory clips (the synthetic benchmark) never pays for them (~0.14 s per
deployed ClientApp process).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import av
    from PIL import Image

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"})

_NUMBER = re.compile(r"\d+")


class ClipReadError(Exception):
    """A clip (frame folder or video file) that cannot be decoded; `path` names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def _frame_number(path: Path) -> tuple[int, str]:
    # DFEW names frames `<clip>_<frame>.jpg`, FERV39k and our `prepare` use `<frame>.jpg`: the
    # *last* number in the stem is the frame number; ties (no number) fall back to the name.
    numbers = _NUMBER.findall(path.stem)
    return (int(numbers[-1]) if numbers else -1, path.name)


def list_frames(folder: str | Path) -> list[Path]:
    """Frame images of a clip folder, in frame-number order (not lexical: 10 after 9)."""
    folder = Path(folder)
    try:
        files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS]
    except OSError as err:
        raise ClipReadError(folder, f"cannot list the frame folder ({err})") from None
    return sorted(files, key=_frame_number)


def sample_indices(
    n_frames: int, num: int, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
    """`num` frame indices in 0..n_frames-1: one per equal segment (TSN-style sampling).

    Training draws a uniform random position inside each segment; test takes each segment's
    centre, so evaluation is deterministic. A clip shorter than `num` has segments shorter than one
    frame, so frames repeat (in order) instead of the clip being dropped.
    """
    if n_frames <= 0:
        raise ValueError(f"a clip needs at least one frame, got {n_frames}")
    if num <= 0:
        raise ValueError(f"num_frames must be positive, got {num}")
    seg = n_frames / num
    if train:
        if rng is None:
            raise ValueError("training sampling needs an rng")
        offsets = rng.random(num)
    else:
        offsets = np.full(num, 0.5)
    idx = np.floor((np.arange(num) + offsets) * seg).astype(np.int64)
    return np.clip(idx, 0, n_frames - 1)


def _square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize: face crops are square already, raw video is not."""
    from PIL import Image

    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return img


def read_image(path: str | Path, size: int) -> np.ndarray:
    """One frame as uint8 size x size x 3 (grayscale repeated to RGB)."""
    from PIL import Image

    with _unreadable_image(path), Image.open(path) as img:
        # JPEG only: decode at a reduced scale when the frame is >= 2x the target (much faster).
        img.draft("RGB", (size, size))
        return np.asarray(_square(img.convert("RGB"), size))


def _folder_frames(files: list[Path]) -> Iterator[np.ndarray]:
    """Each frame image at its own size, RGB H x W x 3 uint8."""
    from PIL import Image

    for f in files:
        with _unreadable_image(f), Image.open(f) as img:
            frame = np.asarray(img.convert("RGB"))
        yield frame


@contextmanager
def _unreadable_image(path: str | Path) -> Iterator[None]:
    """PIL's errors for a frame image become one `ClipReadError` naming the file."""
    from PIL import Image

    try:
        yield
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ClipReadError(path, f"unreadable frame image ({err})") from None


@contextmanager
def _unreadable_video(path: str | Path) -> Iterator[None]:
    """PyAV's errors for a video become one `ClipReadError` naming the file."""
    import av

    try:
        yield
    except ClipReadError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        raise ClipReadError(path, f"unreadable video ({err})") from None


def _video_stream(container: av.container.InputContainer, path: str | Path) -> av.VideoStream:
    if not container.streams.video:
        raise ClipReadError(path, "no video stream in the file")
    return container.streams.video[0]


def iter_video_frames(path: str | Path, every: int = 1) -> Iterator[np.ndarray]:
    """Decoded RGB frames (H x W x 3 uint8) of a video's first video stream, every `every`-th one.

    A file that cannot be opened, has no video stream, or breaks while decoding raises
    `ClipReadError` (a truncated mp4 typically fails here, at open: its index is gone).
    """
    import av

    with _unreadable_video(path), av.open(str(path)) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i % every == 0:
                yield frame.to_ndarray(format="rgb24")


def video_fps(path: str | Path) -> tuple[float | None, int | None]:
    """(frames per second, frame count if the container knows it) of a video file."""
    import av

    with _unreadable_video(path), av.open(str(path)) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate
        return (float(rate) if rate else None), (int(stream.frames) or None)


def open_frames(path: str | Path) -> tuple[Iterator[np.ndarray], float | None, int | None]:
    """(RGB frames H x W x 3 at their own size, fps or None, frame count or None) of a video or a
    frame folder, for reading a whole recording in order (frames decode as they are taken)."""
    path = Path(path)
    if path.is_dir():
        files = list_frames(path)
        if not files:
            raise ClipReadError(path, f"no frame images ({', '.join(sorted(IMAGE_EXTS))})")
        return _folder_frames(files), None, len(files)
    if path.is_file():
        fps, count = video_fps(path)
        return iter_video_frames(path), fps, count
    raise ClipReadError(path, "no such file or folder")


def _video_frames(path: str | Path, size: int) -> list[np.ndarray]:
    """Every frame of a video, already squared and resized (clips are short, a few MB at 112)."""
    from PIL import Image

    frames = [np.asarray(_square(Image.fromarray(f), size)) for f in iter_video_frames(path)]
    if not frames:
        raise ClipReadError(path, "the video decodes to no frames")
    return frames


def read_clip(
    path: str | Path,
    num_frames: int,
    size: int,
    train: bool = False,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """A clip as uint8 T x 3 x size x size, from a frame folder or a video file."""
    path = Path(path)
    if path.is_dir():
        files = list_frames(path)
        if not files:
            raise ClipReadError(path, f"no frame images ({', '.join(sorted(IMAGE_EXTS))})")
        idx = sample_indices(len(files), num_frames, train, rng)
        decoded = {int(i): read_image(files[int(i)], size) for i in np.unique(idx)}
        frames = [decoded[int(i)] for i in idx]
    elif path.is_file() and is_video(path):
        all_frames = _video_frames(path, size)
        idx = sample_indices(len(all_frames), num_frames, train, rng)
        frames = [all_frames[int(i)] for i in idx]
    elif path.exists():
        raise ClipReadError(
            path, f"neither a frame folder nor a video ({', '.join(sorted(VIDEO_EXTS))})"
        )
    else:
        raise ClipReadError(path, "no such file or folder")
    # numpy transposes single-threaded: torch's threaded copy was ~100x slower on a busy CPU.
    return torch.from_numpy(np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2)))
