"""`python -m simulations.predict`: windows along a video, no-face handling, unreadable input.

The face test needs OpenCV's Haar cascade (OpenCV 4.x wheels); it is skipped where the detector is
unavailable. Faces are a real photograph shipped inside matplotlib
(``sample_data/grace_hopper.jpg``) moved across the frame: drawn cartoon faces are not what a Haar
cascade trained on photographs finds, and nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import matplotlib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from hdf.classes import EMOTIONS
from hdf.config import compose, model_settings
from hdf.data.faces import detector_available
from hdf.models import build_model
from hdf.runfolder.folder import RunFolder, rng_state
from simulations import predict as P

needs_detector = pytest.mark.skipif(
    not detector_available(),
    reason="no Haar face detector in this OpenCV (OpenCV 5 wheels dropped it; use 4.x)",
)
FACE_FRAMES, BLANK_FRAMES = 12, 4  # T = 4 (experiment=tiny): three face windows, one blank one


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder holding an untrained tiny model and its config, as the server writes it."""
    tmp = tmp_path_factory.mktemp("predict")
    cfg = compose(["experiment=tiny", f"data.root={tmp}/cache", "device=cpu"])
    torch.manual_seed(0)
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    run = RunFolder.create(tmp / "runs", "tiny")
    text = OmegaConf.to_yaml(cfg, resolve=True)
    run.write_config(text)
    state = {"round": 1, "model": model.state_dict(), "strategy": {}, "rng": rng_state()}
    run.save_checkpoint({**state, "config": text})
    return run.path


def _face() -> np.ndarray:
    """A real face photograph bundled with matplotlib, 192 x 225 pixels."""
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((192, 225)))


def _encode(frames: list[np.ndarray], path: Path, fps: int = 10) -> Path:
    """Frames (H x W x 3 uint8) as an H.264 mp4, written with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _frames(face: bool, n: int, bg: int = 128) -> list[np.ndarray]:
    """240 x 320 frames; with `face`, the photo slides right by 4 pixels a frame."""
    out = []
    img = _face() if face else None
    for i in range(n):
        canvas = np.full((240, 320, 3), bg, np.uint8)
        if img is not None:
            x = 20 + 4 * i
            canvas[8 : 8 + img.shape[0], x : x + img.shape[1]] = img
        out.append(canvas)
    return out


@needs_detector
def test_faces_found_one_row_per_window(run_dir: Path, tmp_path: Path) -> None:
    """Prepare: 12 face frames then 4 blank ones. Execute: predict with stride T. Assert: rows."""
    video = _encode(_frames(True, FACE_FRAMES) + _frames(False, BLANK_FRAMES), tmp_path / "a.mp4")
    out_csv, out_json, strip = tmp_path / "p.csv", tmp_path / "p.json", tmp_path / "s.png"
    argv = [str(video), str(run_dir), "--csv", str(out_csv), "--json", str(out_json)]
    assert P.main([*argv, "--strip", str(strip), "--device", "cpu"]) == 0

    rows = list(csv.DictReader(out_csv.open()))
    assert [(int(r["start_frame"]), int(r["end_frame"])) for r in rows] == [
        (0, 3),
        (4, 7),
        (8, 11),
        (12, 15),
    ]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "no-face"]
    for r in rows[:3]:
        assert int(r["face_frames"]) >= 3  # the detector found the photo in (nearly) every frame
        probs = [float(r[f"p_{e}"]) for e in EMOTIONS]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert r["prediction"] in EMOTIONS
        # the box lies on the pasted photo (x from 20 + 4i to 212 + 4i, y from 8 to 233)
        x, y, w, h = (int(r[k]) for k in ("box_x", "box_y", "box_w", "box_h"))
        assert x >= 20 and x + w <= 212 + 4 * 11 and y >= 8 and y + h <= 233
    assert rows[3]["prediction"] == "" and rows[3]["p_happy"] == ""
    info = json.loads(out_json.read_text())
    assert info["frames"] == FACE_FRAMES + BLANK_FRAMES and info["window_frames"] == 4
    assert info["fps"] == pytest.approx(10.0)
    assert set(range(FACE_FRAMES, FACE_FRAMES + BLANK_FRAMES)) <= set(info["frames_without_face"])
    with Image.open(strip) as img:
        assert img.width > 0 and img.height > 0


@needs_detector
def test_stride_overlapping_windows_and_tail(run_dir: Path, tmp_path: Path) -> None:
    """Stride 3 over 12 frames: windows at 0, 3, 6 and a last one ending on frame 11."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, f in enumerate(_frames(True, FACE_FRAMES)):
        Image.fromarray(f).save(frames / f"{i}.png")  # 10 after 9: sorted by frame number
    out_json = tmp_path / "p.json"
    argv = [str(frames), str(run_dir), "--stride", "3", "--fps", "25", "--json", str(out_json)]
    assert P.main(argv) == 0
    rows = json.loads(out_json.read_text())["windows"]
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 3), (3, 6), (6, 9), (8, 11)]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[1]["start_s"] == pytest.approx(3 / 25)


@needs_detector
def test_blank_video_reports_no_face_and_exit_0(run_dir: Path, tmp_path: Path, capsys) -> None:
    video = _encode(_frames(False, 8), tmp_path / "blank.mp4")
    out_json = tmp_path / "p.json"
    assert P.main([str(video), str(run_dir), "--json", str(out_json)]) == 0
    assert "no face found in any of the 8 frames" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())["windows"]
    assert len(rows) == 2 and all(r["status"] == "no-face" for r in rows)


def test_truncated_video_fails_with_its_name_and_exit_2(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    """A cut-off mp4 (its index at the end is lost) is an error naming the file, code 2."""
    video = _encode(_frames(False, 8), tmp_path / "cut.mp4")
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    assert P.main([str(video), str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "cut.mp4: unreadable video" in err and err.count("\n") == 1


def test_missing_input_and_unreadable_checkpoint_exit_2(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    assert P.main([str(tmp_path / "none.mp4"), str(run_dir)]) == 2
    assert "none.mp4" in capsys.readouterr().err
    video = _encode(_frames(False, 4), tmp_path / "ok.mp4")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert P.main([str(video), str(bad)]) == 2
    assert "bad.pt" in capsys.readouterr().err


def test_windows_and_no_face_logic_with_a_stub_detector(
    run_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The window rules alone (any OpenCV): a stub 'detector' finds the bright square.

    Frames 0-4 show the square, 5-9 do not: with T = 4 and min-face-frac 0.5, window 0-3 is
    classified, 4-7 (one face frame) is no-face, the tail 6-9 is no-face.
    """

    def stub(frame: np.ndarray, min_size: float = 0.1):
        ys, xs = np.nonzero(frame[..., 0] > 200)
        if len(xs) == 0:
            return None
        return int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)

    monkeypatch.setattr(P, "detect_face", stub)
    frames = []
    for i in range(10):
        f = np.zeros((60, 80, 3), np.uint8)
        if i < 5:
            f[10:40, 20 + i : 50 + i] = 255
        frames.append(f)
    video = _encode(frames, tmp_path / "sq.mp4")
    model, _ = P.load_model(run_dir)
    pred = P.predict(video, model)
    assert [(w.start, w.end, w.status) for w in pred.windows] == [
        (0, 3, "ok"),
        (4, 7, "no-face"),
        (6, 9, "no-face"),
    ]
    assert pred.windows[0].box is not None and pred.windows[0].probs is not None
    assert pred.windows[0].probs.shape == (len(EMOTIONS),)
    # a clip shorter than T gives one window with frames repeated
    short = P.predict(_encode(frames[:2], tmp_path / "short.mp4"), model)
    assert [(w.start, w.end, w.status) for w in short.windows] == [(0, 1, "ok")]
