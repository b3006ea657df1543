"""Real-data loaders on fixture trees in DFEW and FERV39k layouts, manifest, prepare."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image
from torch.utils.data import DataLoader

import hdf.data.multi  # noqa: F401  (registers multi and the dfew, ferv39k, manifest it imports)
from hdf.classes import EMOTIONS
from hdf.data import build_sources
from hdf.data.faces import FacePolicy, crop_face, detect_face, detector_available
from hdf.data.folder_dataset import FolderClipDataset, hash_split
from hdf.data.frames import ClipReadError, list_frames, read_clip, sample_indices
from simulations import prepare
from tests.fixtures_real import (
    blank,
    drawn_face,
    frame_array,
    make_dfew,
    make_ferv39k,
    truncate,
    write_frames,
    write_mp4,
)

T, SIZE = 4, 16
BASE = {"num_frames": T, "size": SIZE, "seed": 0}


def counts(sources, split):
    return {s.name: len(s.split(split)) for s in sources}


# ---- frames -------------------------------------------------------------------------------------


def test_sample_indices_test_centred_train_within_segments():
    """Test takes segment centres; training draws one position inside each segment."""
    assert sample_indices(32, 8, train=False).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    rng = np.random.default_rng(0)
    draws = np.stack([sample_indices(32, 8, True, rng) for _ in range(200)])
    lo = np.arange(8) * 4
    assert ((draws >= lo) & (draws < lo + 4)).all()
    assert all(len(set(draws[:, k])) == 4 for k in range(8))  # every offset in a segment occurs


def test_sample_indices_short_clip_repeats_frames_in_order():
    idx = sample_indices(5, 8, train=False)
    assert idx.tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    for _ in range(20):
        idx = sample_indices(3, 16, True, np.random.default_rng(_))
        assert (np.diff(idx) >= 0).all() and idx.min() >= 0 and idx.max() <= 2


def test_frames_sorted_by_number_and_read_shape(tmp_path):
    """Frames 1..12 named without padding are read in frame order, not name order."""
    clip = write_frames(tmp_path / "c", code=50, n=12, name="f{i}.jpg")
    assert [p.name for p in list_frames(clip)][8:11] == ["f9.jpg", "f10.jpg", "f11.jpg"]
    x = read_clip(clip, num_frames=6, size=SIZE)
    assert x.shape == (6, 3, SIZE, SIZE) and x.dtype == torch.uint8
    green = x[:, 1].float().mean((1, 2)) / 8  # frame index encoded in green
    assert np.allclose(green.numpy(), [1, 3, 5, 7, 9, 11], atol=0.5)


# ---- DFEW ---------------------------------------------------------------------------------------


def test_dfew_fold_counts_and_label_shift(tmp_path):
    labels = make_dfew(tmp_path, n_clips=20)
    for fold in (1, 3):
        (src,) = build_sources({**BASE, "name": "dfew", "root": str(tmp_path), "fold": fold})
        test = src.split("test")
        assert len(test) == 4  # ids with id % 5 == fold - 1
        assert len(src.split("train")) + len(src.split("val")) == 16
        assert len(src.split("val")) == 2  # round(0.1 * 16)
        ids = [Path(p).name for p in test.paths]
        assert all(int(i) % 5 == fold - 1 for i in ids)
        # official 1-based labels shifted to 0-based DFEW order
        assert test.labels.tolist() == [labels[i] for i in ids]
    clip, label, index = src.split("test")[0]
    assert clip.shape == (T, 3, SIZE, SIZE) and index == 0 and label == labels[ids[0]]


def test_dfew_val_split_disjoint_and_deterministic(tmp_path):
    make_dfew(tmp_path, n_clips=20)
    cfg = {**BASE, "name": "dfew", "root": str(tmp_path), "val_fraction": 0.25}
    a = build_sources(cfg)[0]
    b = build_sources(cfg)[0]
    assert a.split("val").paths == b.split("val").paths
    assert not set(a.split("val").paths) & set(a.split("train").paths)


def test_dfew_hash_rule_deterministic_partition(tmp_path):
    make_dfew(tmp_path, n_clips=25)
    cfg = {**BASE, "name": "dfew", "root": str(tmp_path), "sources_rule": "hash", "num_sources": 3}
    first = build_sources(cfg)
    assert [s.name for s in first] == ["part0", "part1", "part2"]
    tests = [set(s.split("test").paths) for s in first]
    assert sum(map(len, tests)) == 5 and not (tests[0] & tests[1])
    again = build_sources(cfg)
    assert [set(s.split("test").paths) for s in again] == tests
    assert [s.split("test").source_index for s in first] == [0, 1, 2]


def test_dfew_csv_rule_variant_and_spelling(tmp_path):
    make_dfew(tmp_path, n_clips=10, split_dir="{split}(single_labeled)", variant="clip_224x224_16f")
    mapping = tmp_path / "sites.csv"
    mapping.write_text(
        "video_name,source\n" + "".join(f"{i},{'b' if i <= 6 else 'a'}\n" for i in range(1, 11))
    )
    cfg = {**BASE, "name": "dfew", "root": str(tmp_path), "variant": "clip_224x224_16f"}
    srcs = build_sources({**cfg, "sources_rule": "csv", "source_csv": str(mapping)})
    assert [s.name for s in srcs] == ["a", "b"]
    assert all("clip_224x224_16f" in p for p in srcs[0].split("test").paths)
    assert counts(srcs, "test") == {"a": 1, "b": 1}  # ids 10 and 5 test in fold 1


# ---- FERV39k ------------------------------------------------------------------------------------


def test_ferv39k_scenes_labels_by_name(tmp_path):
    rows = make_ferv39k(tmp_path)
    srcs = build_sources({**BASE, "name": "ferv39k", "root": str(tmp_path), "val_fraction": 0})
    assert [s.name for s in srcs] == ["Action", "Crime", "DailyLife", "Interview"]  # SCENES order
    assert counts(srcs, "train") == dict.fromkeys(["Action", "Crime", "DailyLife", "Interview"], 7)
    assert counts(srcs, "test") == dict.fromkeys(["Action", "Crime", "DailyLife", "Interview"], 2)
    train = srcs[1].split("train")
    by_path = {str(tmp_path / "2_ClipsforFaceCrop" / rel): emo for rel, emo, _ in rows}
    for path, label in zip(train.paths, train.labels, strict=True):
        assert EMOTIONS[label] == by_path[path].lower()  # name mapping into the DFEW order
    assert sorted(train.labels.tolist()) == list(range(7))
    assert EMOTIONS.index("surprise") == 4 and EMOTIONS.index("disgust") == 5


def test_ferv39k_scenarios_and_subset(tmp_path):
    make_ferv39k(tmp_path)
    cfg = {**BASE, "name": "ferv39k", "root": str(tmp_path), "sources_by": "scenario"}
    srcs = build_sources(cfg)
    assert [s.name for s in srcs] == [
        "daily_life",
        "weak_interactive_shows",
        "strong_interactive_activities",
        "anomalous_issues",
    ]
    assert counts(srcs, "test") == dict.fromkeys([s.name for s in srcs], 2)
    custom = {"studio": ["Interview"], "street": ["Action", "Crime", "DailyLife"]}
    srcs = build_sources({**cfg, "scenarios": custom, "sources": ["street"]})
    assert [s.name for s in srcs] == ["street"] and len(srcs[0].split("test")) == 6
    scene = build_sources({**BASE, "name": "ferv39k", "root": str(tmp_path), "sources": ["Crime"]})
    assert [s.name for s in scene] == ["Crime"]


# ---- manifest and mp4 ---------------------------------------------------------------------------


def _manifest(tmp_path: Path, rows: list[dict[str, str]], name: str = "site.csv") -> Path:
    path = tmp_path / name
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_manifest_mp4_and_frames(tmp_path):
    write_mp4(tmp_path / "v" / "a.mp4", [frame_array(200, i) for i in range(10)])
    write_frames(tmp_path / "f" / "b", code=100, n=6)
    rows = [
        {"path": "v/a.mp4", "label": "Happiness", "split": "test"},
        {"path": str(tmp_path / "f" / "b"), "label": "fear", "split": "test"},
        {"path": "f/b", "label": "sad", "split": "train"},
    ]
    (src,) = build_sources({**BASE, "name": "manifest", "manifest": str(_manifest(tmp_path, rows))})
    assert src.name == "site"  # no source column: the manifest's stem
    test = src.split("test")
    assert test.labels.tolist() == [0, 6]
    clip, label, _ = test[0]
    assert clip.shape == (T, 3, SIZE, SIZE) and clip.dtype == torch.uint8 and label == 0
    assert abs(clip[:, 0].float().mean().item() - 200) < 12  # red code survives the codec
    green = clip[:, 1].float().mean((1, 2)).numpy() / 8  # centred frames of 10: 1, 3, 6, 8
    assert np.allclose(green, [1, 3, 6, 8], atol=0.6)


def test_manifest_sources_and_hash_split(tmp_path):
    rows = []
    for i in range(20):
        write_frames(tmp_path / f"c{i}", code=i, n=2)
        rows.append(
            {"path": f"c{i}", "label": EMOTIONS[i % 7], "source": "north" if i < 10 else "south"}
        )
    cfg = {**BASE, "name": "manifest", "manifest": str(_manifest(tmp_path, rows))}
    srcs = build_sources(cfg)
    assert [s.name for s in srcs] == ["north", "south"]
    for s in srcs:
        assert [len(s.split(k)) for k in ("train", "val", "test")] == [7, 1, 2]
    again = build_sources(cfg)
    assert again[0].split("test").paths == srcs[0].split("test").paths
    assert hash_split(list("abcdefghij"), {"val": 0.1, "test": 0.2}).count("test") == 2


def test_manifest_unknown_label_lists_known(tmp_path):
    write_frames(tmp_path / "c", code=1, n=2)
    path = _manifest(tmp_path, [{"path": "c", "label": "bored"}])
    with pytest.raises(ValueError, match=r"site.csv:2.*bored.*happy, sad, neutral"):
        build_sources({**BASE, "name": "manifest", "manifest": str(path)})


# ---- corrupt files ------------------------------------------------------------------------------


def _corrupt_set(tmp_path: Path) -> FolderClipDataset:
    """Clips 0..3: clip 1 has a truncated JPEG, clip 2 is a truncated mp4, clip 3 a garbage mp4."""
    good0 = write_frames(tmp_path / "g0", code=10, n=4)
    bad_jpg = write_frames(tmp_path / "b1", code=20, n=4)
    truncate(bad_jpg / "00003.jpg", 0.4)
    bad_mp4 = write_mp4(tmp_path / "b2.mp4", [frame_array(30, i) for i in range(6)])
    truncate(bad_mp4, 0.5)
    junk = tmp_path / "b3.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    good4 = write_mp4(tmp_path / "g4.mp4", [frame_array(200, i) for i in range(6)])
    entries = [(good0, 0), (bad_jpg, 1), (bad_mp4, 2), (junk, 3), (good4, 4)]
    return FolderClipDataset(entries, 7, num_frames=T, size=SIZE, train=False)


def test_corrupt_clips_skipped_counted_labels_stay_right(tmp_path):
    ds = _corrupt_set(tmp_path)
    with pytest.raises(ClipReadError):
        read_clip(tmp_path / "b2.mp4", T, SIZE)
    clip, label, index = ds[1]  # unreadable: replaced by the next readable clip, its own label
    assert label == 4 and index == 7
    assert abs(clip[:, 0].float().mean().item() - 200) < 12  # it really is clip 4
    assert ds.skipped == 3 and {Path(p).name for p in ds.bad_paths} == {"b1", "b2.mp4", "b3.mp4"}
    assert ds[0][1] == 0 and ds[3][1] == 4 and ds.skipped == 3  # each bad clip counted once


def test_corrupt_clips_counted_across_loader_workers(tmp_path):
    ds = _corrupt_set(tmp_path)
    seen = []
    for clips, labels, _ in DataLoader(ds, batch_size=2, num_workers=2):
        for c, lab in zip(clips, labels, strict=True):
            seen.append((round(c[:, 0].float().mean().item() / 10), int(lab)))
    assert seen.count((1, 0)) == 1 and seen.count((20, 4)) == 4  # red code / 10 matches the label
    assert ds.skipped == 3  # flags written in the workers are seen here


def test_missing_clip_folder_counted_at_start(tmp_path):
    labels = make_dfew(tmp_path, n_clips=10)
    shutil.rmtree(tmp_path / "Clip" / "clip_224x224" / "00005")
    (src,) = build_sources({**BASE, "name": "dfew", "root": str(tmp_path)})
    test = src.split("test")  # fold 1 tests ids 5 and 10
    assert len(test) == 1 and test.skipped == 1 and test.labels.tolist() == [labels["00010"]]


# ---- bad configuration --------------------------------------------------------------------------


def test_missing_root_split_file_and_column_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*Clip/clip_224x224"):
        build_sources({**BASE, "name": "dfew", "root": str(tmp_path / "nowhere")})
    make_dfew(tmp_path, n_clips=6)
    split = tmp_path / "EmoLabel_DataSplit" / "test(single-labeled)" / "set_2.csv"
    split.unlink()
    with pytest.raises(FileNotFoundError, match=r"test\(single-labeled\)/set_2.csv"):
        build_sources({**BASE, "name": "dfew", "root": str(tmp_path), "fold": 2})
    split.write_text("clip,label\n1,1\n")
    with pytest.raises(ValueError, match=r"set_2.csv: missing column.*video_name"):
        build_sources({**BASE, "name": "dfew", "root": str(tmp_path), "fold": 2})
    with pytest.raises(FileNotFoundError, match="2_ClipsforFaceCrop"):
        build_sources({**BASE, "name": "ferv39k", "root": str(tmp_path)})
    (tmp_path / "2_ClipsforFaceCrop").mkdir()
    with pytest.raises(FileNotFoundError, match=r"All_scenes/train_All\.csv"):
        build_sources({**BASE, "name": "ferv39k", "root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        build_sources({**BASE, "name": "manifest", "manifest": str(tmp_path / "missing.csv")})


def test_empty_source_is_an_error_at_startup(tmp_path):
    make_dfew(tmp_path, n_clips=6)
    cfg = {**BASE, "name": "dfew", "root": str(tmp_path), "sources_rule": "hash"}
    srcs = build_sources({**cfg, "num_sources": 40})
    empty = next(s for s in srcs if not any(s.dataset.load_split(s.name, "test", 0).paths))
    with pytest.raises(ValueError, match=f"{empty.name}.*no clips"):
        empty.split("test")


def test_hydra_configs_require_paths():
    from hdf.config import compose

    for group, key in (("dfew", "root"), ("ferv39k", "root"), ("manifest", "manifest")):
        cfg = compose([f"data={group}"])
        assert cfg.data.num_frames == 16 and cfg.data.size == 112 and cfg.data.heldout == []
        with pytest.raises(MissingMandatoryValue):
            build_sources(cfg.data)
        assert OmegaConf.is_missing(cfg.data, key)
    assert "datasets" in compose(["data=multi"]).data


# ---- several datasets ---------------------------------------------------------------------------


def test_multi_prefixes_sources_and_indices(tmp_path):
    make_dfew(tmp_path / "dfew", n_clips=10)
    make_ferv39k(tmp_path / "ferv", scenes=("Action", "War"))
    write_frames(tmp_path / "site" / "c0", code=1, n=3)
    man = _manifest(tmp_path / "site", [{"path": "c0", "label": "angry", "split": "test"}])
    cfg = {
        **BASE,
        "name": "multi",
        "datasets": [
            {"name": "dfew", "root": str(tmp_path / "dfew")},
            {"name": "ferv39k", "root": str(tmp_path / "ferv")},
            {"name": "manifest", "manifest": str(man), "alias": "clinic"},
        ],
    }
    srcs = build_sources(cfg)
    assert [s.name for s in srcs] == ["dfew/dfew", "ferv39k/Action", "ferv39k/War", "clinic/site"]
    assert srcs[2].split("test")[0][2] == 2 and srcs[3].split("test")[0][1:] == (3, 3)
    pooled = build_sources({**cfg, "one_source_per_dataset": True})
    assert [s.name for s in pooled] == ["dfew", "ferv39k", "clinic"]
    ferv_test = pooled[1].split("test")
    assert len(ferv_test) == 4 and {ferv_test[i][2] for i in range(4)} == {1}


# ---- faces and prepare --------------------------------------------------------------------------


def test_crop_face_pads_at_the_border():
    frame = np.zeros((40, 60, 3), dtype=np.uint8)
    frame[:, :10] = 255
    crop = crop_face(frame, (0, 0, 20, 20), margin=0.5, size=24)
    assert crop.shape == (24, 24, 3) and crop[0, 0, 0] == 255  # edge pixels repeated


def _raw_videos(raw: Path) -> None:
    faces = [drawn_face(128, 1.0, (d, 0)) for d in (-4, -2, 0, 2, 4, 2)]
    write_mp4(raw / "happy" / "one.mp4", faces + [blank(128)] * 2)  # 6 face + 2 empty frames
    write_mp4(raw / "sad" / "two.mp4", [blank(128)] * 4)  # no face at all


def _bright_box(frame: np.ndarray, min_size: float = 0.1) -> tuple[int, int, int, int] | None:
    """A stand-in detector: the bounding box of skin-bright pixels (the drawn face's oval)."""
    ys, xs = np.nonzero(frame[..., 0] > 150)
    if len(xs) < 50:
        return None
    return int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1


def test_prepare_pipeline_with_stand_in_detector(tmp_path):
    """Cropping, skipping and counting no-face frames, and the manifest, whatever OpenCV ships."""
    _raw_videos(tmp_path / "raw")
    s = prepare.prepare(tmp_path / "raw", tmp_path / "out", size=32, detector=_bright_box)
    assert (s.videos, s.clips, s.frames_kept, s.frames_no_face) == (2, 1, 6, 6)
    assert {Path(p).name: v for p, v in s.left_out.items()} == {"two.mp4": (0, 4)}
    (src,) = build_sources({**BASE, "name": "manifest", "manifest": str(s.manifest)})
    rows = list(csv.DictReader(s.manifest.open()))
    assert rows == [{"path": "clips/happy/one", "label": "happy"}]
    clip, label, _ = src.split("train")[0]  # a single clip stays in train
    assert clip.shape == (T, 3, SIZE, SIZE) and label == 0
    assert len(list_frames(tmp_path / "out" / "clips" / "happy" / "one")) == 6


@pytest.mark.skipif(not detector_available(), reason="no bundled Haar cascade (OpenCV 5 wheel)")
def test_haar_finds_the_drawn_face_and_not_a_blank_frame():
    box = detect_face(drawn_face(160))
    assert box is not None and 40 < box[2] < 160
    assert detect_face(blank(160)) is None


@pytest.mark.skipif(not detector_available(), reason="no bundled Haar cascade (OpenCV 5 wheel)")
def test_prepare_command_end_to_end(tmp_path, capsys):
    _raw_videos(tmp_path / "raw")
    code = prepare.main([str(tmp_path / "raw"), str(tmp_path / "out"), "--size", "32"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[-1] == str(tmp_path / "out" / "manifest.csv")
    frames = list_frames(tmp_path / "out" / "clips" / "happy" / "one")
    assert 4 <= len(frames) <= 6  # the cascade finds the drawn face in most frames, no blanks
    assert not (tmp_path / "out" / "clips" / "sad").exists()


def test_prepare_reports_missing_detector_or_labels(tmp_path, capsys):
    """One line on stderr naming the video and the fix, whatever the terminal or tmp path."""
    video = tmp_path / ("long-folder-name-" * 6) / "raw" / "nolabel.mp4"
    write_mp4(video, [blank(32)] * 2)
    assert prepare.main([str(video.parent), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{video} has no label: put videos in <label>/ sub-folders" in err


def _title_frame(letters: bool) -> np.ndarray:
    """A dark title card; with `letters`, a block of bright lettering a detector may mistake."""
    frame = blank(128)
    if letters:
        frame[40:90, 20:108] = (230, 230, 230)
        frame[50:80, 30:100:6] = (40, 60, 90)  # gaps between the "letters"
    return frame


def test_face_policy_rule_by_hand() -> None:
    """needed(n) = max(ceil(min_face_frac * n), min_face_frames)."""
    p = FacePolicy()
    assert [p.needed(n) for n in (1, 4, 7, 12, 16)] == [3, 3, 4, 6, 8]
    assert FacePolicy(min_face_frac=0.25, min_face_frames=1).needed(10) == 3
    assert p.enough(6, 12) and not p.enough(5, 12)
    with pytest.raises(ValueError, match="--min-face-frac"):
        FacePolicy(min_face_frac=0)


def test_prepare_leaves_out_a_video_of_false_detections(tmp_path, capsys, monkeypatch):
    """A title sequence whose only 'faces' are 2 false detections in 12 frames writes no clip,
    is counted with its numbers, and the contact sheet shows only the real clip."""
    raw = tmp_path / "raw"
    _raw_videos(raw)  # happy/one: 6 face frames of 8; sad/two: no face
    write_mp4(raw / "neutral" / "title.mp4", [_title_frame(i in (3, 4)) for i in range(12)])
    s = prepare.prepare(raw, tmp_path / "out", size=32, detector=_bright_box)
    assert s.clips == 1 and s.frames_kept == 6
    left = {Path(p).name: v for p, v in s.left_out.items()}
    assert left == {"title.mp4": (2, 12), "two.mp4": (0, 4)}
    assert s.frames_no_face == 2 + 12 + 4  # the real clip's 2 blanks, every left-out frame
    assert not (tmp_path / "out" / "clips" / "neutral").exists()
    rows = list(csv.DictReader(s.manifest.open()))
    assert rows == [{"path": "clips/happy/one", "label": "happy"}]
    assert s.contact_sheet == tmp_path / "out" / "contact_sheet.png"
    with Image.open(s.contact_sheet) as sheet:  # one row of 6 crops of 64 px
        assert sheet.size == (240 + 6 * 68, 72)
        row = np.asarray(sheet.convert("RGB"))[4:68, 240:304]
    assert row.std() > 10  # a crop, not the white background

    # the command: nothing but the title sequence -> no clip, one error line, exit 2
    only = tmp_path / "only"
    (only / "neutral").mkdir(parents=True)
    shutil.copy(raw / "neutral" / "title.mp4", only / "neutral" / "title.mp4")
    monkeypatch.setattr(prepare, "detect_face", _bright_box)
    assert prepare.main([str(only), str(tmp_path / "out2"), "--size", "32"]) == 2
    out, err = capsys.readouterr()
    assert f"left out: {only / 'neutral' / 'title.mp4'}: 2 of 12 frames show a face, needs 6" in out
    assert err.count("\n") == 1 and "no clip written from the 1 video(s)" in err
    assert not (tmp_path / "out2" / "contact_sheet.png").exists()
