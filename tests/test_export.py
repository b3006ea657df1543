"""Exported models (torch.export and TorchScript) give the PyTorch model's logits (atol 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hdf.checkpoint import load_model
from hdf.config import compose, model_settings
from hdf.export import (
    SUFFIX,
    ClipClassifier,
    example_clips,
    export_model,
    load_exported,
)
from hdf.models import build_model
from hdf.runfolder.folder import RunFolder, rng_state
from simulations import export as export_cli


def _run(root: Path, *overrides: str) -> Path:
    """A run folder with a tiny model whose BatchNorm statistics are not the defaults."""
    cfg = compose(["experiment=tiny", f"data.root={root}/cache", "device=cpu", *overrides])
    torch.manual_seed(0)
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    with torch.no_grad():  # one training-mode pass moves the running statistics
        model.train()(model.preprocess(example_clips(model, batch=4, seed=7)))
    run = RunFolder.create(root / "runs", "tiny")
    text = OmegaConf.to_yaml(cfg, resolve=True)
    run.save_checkpoint(
        {
            "round": 2,
            "model": model.state_dict(),
            "strategy": {},
            "rng": rng_state(),
            "config": text,
        }
    )
    return run.path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def run_dir_no_dam(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("export_nodam"), "model.dam.enabled=false")


def _check_same_logits(run: Path, path: Path, fmt: str | None) -> None:
    """Prepare: the checkpoint's model. Execute: export (unless `fmt` is None: done), reload.

    Assert: the same logits for batch sizes other than the one traced with.
    """
    model, cfg = load_model(run)
    if fmt is not None:
        path = export_model(model, path, fmt)
    assert path.is_file() and path.suffix in SUFFIX.values()
    exported, meta = load_exported(path)
    assert meta["num_frames"] == cfg["data"]["num_frames"] and meta["size"] == cfg["data"]["size"]
    assert len(meta["classes"]) == 7
    eager = ClipClassifier(model).eval()
    for batch in (1, 3, 5):  # traced / exported with batch 2
        clips = example_clips(model, batch=batch, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(exported(clips), eager(clips), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def exported_pt2(run_dir: Path, tmp_path_factory) -> Path:
    """The tiny model exported once with torch.export (the slow step), shared by two tests."""
    model, _ = load_model(run_dir)
    return export_model(model, tmp_path_factory.mktemp("pt2") / "m.pt2", "export")


def test_torch_export_logits_match_pytorch(run_dir: Path, exported_pt2: Path) -> None:
    _check_same_logits(run_dir, exported_pt2, None)


def test_torchscript_logits_match_pytorch_without_dam(run_dir_no_dam: Path, tmp_path: Path) -> None:
    _check_same_logits(run_dir_no_dam, tmp_path / "m.ts", "torchscript")


def test_torchscript_with_dam(run_dir: Path, tmp_path: Path) -> None:
    """DAM traces to plain tensor ops, so the default model exports to TorchScript too."""
    _check_same_logits(run_dir, tmp_path / "m.ts", "torchscript")


def test_export_cli_writes_next_to_the_checkpoint(run_dir: Path, capsys) -> None:
    assert export_cli.main([str(run_dir)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(summary["path"]) == run_dir / "model.pt2" and summary["max_abs_diff"] <= 1e-5


def test_export_rejects_wrong_clip_shape(run_dir: Path, exported_pt2: Path) -> None:
    """torch.export keeps T and size fixed and checks them at call time."""
    model, _ = load_model(run_dir)
    exported, _ = load_exported(exported_pt2)
    wrong_t = torch.zeros(1, model.num_frames + 1, 3, model.size, model.size, dtype=torch.uint8)
    with pytest.raises((RuntimeError, AssertionError, ValueError)):
        exported(wrong_t)
