"""A crafted torch file never runs its code: checkpoints (evaluate, resume) and model.weights.

The payload is a pickle `__reduce__` that creates a marker file when unpickled. Each test first
proves the payload is live (plain `torch.load(weights_only=False)` creates the marker), then that
every way the project opens such a file refuses it with one line and leaves no marker.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hdf.checkpoint import CheckpointError, load_model
from hdf.config import compose, model_settings
from hdf.models import build_model
from hdf.models.weights import WeightsError
from hdf.runfolder.folder import RunFolder, rng_state
from simulations import evaluate as E
from simulations import run as R


class Payload:
    """Unpickling this runs `touch <marker>` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_cfg(tmp_path: Path):
    return compose(["experiment=tiny", f"data.root={tmp_path}/cache", f"output.root={tmp_path}"])


def _crafted_run(tmp_path: Path, marker: Path) -> Path:
    """A run folder whose config is genuine and whose checkpoint carries the payload."""
    cfg = _tiny_cfg(tmp_path)
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    run = RunFolder.create(tmp_path / "runs", "crafted")
    text = OmegaConf.to_yaml(cfg, resolve=True)
    run.write_config(text)
    state = {"round": 1, "model": model.state_dict(), "strategy": {}, "rng": rng_state()}
    torch.save({**state, "config": text, "extra": Payload(marker)}, run.path / "checkpoint.pt")
    torch.load(run.path / "checkpoint.pt", weights_only=False)  # the payload is live ...
    assert marker.exists()
    marker.unlink()  # ... and is removed again before the project opens the file
    return run.path


def _one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_evaluate_refuses_a_crafted_checkpoint(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    run = _crafted_run(tmp_path, marker)
    assert E.main([str(run)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"{run / 'checkpoint.pt'}: refused to open: it names posix.system" in err
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to open"):
        load_model(run)
    assert not marker.exists()


def test_resume_refuses_a_crafted_checkpoint(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    run = _crafted_run(tmp_path, marker)
    assert R.main([f"resume={run}"]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "refused to open" in err and "resume= only a run folder written by" in err
    assert not marker.exists()


def test_weights_file_with_a_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, path)
    cfg = _tiny_cfg(tmp_path)
    with pytest.raises(WeightsError, match="refused to open"):
        build_model(
            model_settings({**OmegaConf.to_container(cfg.model), "weights": str(path)}), 4, 32
        )
    assert not marker.exists()


def test_a_project_checkpoint_with_numpy_state_still_loads(tmp_path: Path) -> None:
    """RNG states and per-source numpy arrays (local strategy, FedBN) are on the allow-list."""
    run = RunFolder.create(tmp_path, "ok")
    local = {0: {"bn.weight": np.arange(3, dtype=np.float32), "n": np.array(7, dtype=np.int64)}}
    local[1] = {"norms": [np.float64(0.25), np.float32(2.0)]}  # numpy scalars: dtype + bytes
    run.save_checkpoint({"round": 3, "model": {"w": torch.ones(2)}, "rng": rng_state(), "s": local})
    back = run.load_checkpoint()
    assert back is not None and back["round"] == 3
    assert back["s"][1]["norms"] == [0.25, 2.0]
    assert np.array_equal(back["s"][0]["bn.weight"], np.arange(3, dtype=np.float32))
    assert int(back["s"][0]["n"]) == 7
    assert np.array_equal(back["rng"]["numpy"][1], np.random.get_state()[1])
