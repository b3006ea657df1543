"""Initial weights from a local file: exact round trips, clear errors for files that don't fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hdf.config import model_settings
from hdf.config.schema import ModelConfig
from hdf.models import build_model
from hdf.models.weights import WeightsError, load_weights

T, SIZE = 4, 32


def _cfg(weights: object = None, **overrides: object) -> ModelConfig:
    """A small tiny3d model without DAM (weights logic does not depend on it)."""
    cfg: dict = {"backbone": "tiny3d", "width": 8, "dam": {"enabled": False}, "weights": weights}
    cfg.update(overrides)
    return model_settings(cfg)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every state_dict entry of `a` and `b` is bit-identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_whole_model_round_trips_exactly(tmp_path: Path) -> None:
    """A saved HDFNet state_dict, given as model.weights, restores every tensor exactly."""
    torch.manual_seed(0)
    src = build_model(_cfg(), T, SIZE)
    src.backbone.stem[1].running_mean.add_(0.5)  # buffers travel too
    path = tmp_path / "model.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    dst = build_model(_cfg(weights=str(path)), T, SIZE)
    _assert_same_state(src, dst)


def test_checkpoint_dict_with_model_key_and_module_prefix(tmp_path: Path) -> None:
    """A checkpoint {'model': state_dict, ...} saved from DataParallel ('module.' keys) loads."""
    torch.manual_seed(0)
    src = build_model(_cfg(), T, SIZE)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "round": 3}, path)
    torch.manual_seed(1)
    dst = build_model(_cfg(), T, SIZE)
    assert load_weights(dst, path) == "model"
    _assert_same_state(src, dst)


def test_backbone_only_file_loads_into_the_backbone(tmp_path: Path) -> None:
    """A backbone state_dict fills the backbone and leaves the new head alone."""
    torch.manual_seed(0)
    src = build_model(_cfg(), T, SIZE)
    path = tmp_path / "backbone.pt"
    torch.save(src.backbone.state_dict(), path)
    torch.manual_seed(1)
    dst = build_model(_cfg(), T, SIZE)
    head_before = dst.head.weight.detach().clone()
    assert load_weights(dst, path) == "backbone"
    _assert_same_state(src.backbone, dst.backbone)
    assert torch.equal(dst.head.weight, head_before)


def test_torchvision_file_with_a_kinetics_head_loads(tmp_path: Path) -> None:
    """A torchvision video ResNet file keeps its 400-class fc; the backbone loads, fc is dropped."""
    torch.manual_seed(0)
    cfg = {"backbone": "mc3_18", "dam": {"enabled": False}}
    src = build_model(model_settings(cfg), T, SIZE)
    state = dict(src.backbone.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(400, 512), torch.zeros(400)
    path = tmp_path / "mc3_18_kinetics.pth"
    torch.save(state, path)
    torch.manual_seed(1)
    dst = build_model(model_settings({**cfg, "weights": str(path)}), T, SIZE)
    _assert_same_state(src.backbone, dst.backbone)


def test_shape_mismatch_names_file_keys_shapes_and_fix(tmp_path: Path) -> None:
    """Weights of a wider tiny3d fail naming the file, the first keys with both shapes, the fix."""
    path = tmp_path / "wide.pt"
    torch.save(build_model(_cfg(width=16), T, SIZE).state_dict(), path)
    with pytest.raises(WeightsError) as err:
        build_model(_cfg(weights=str(path)), T, SIZE)
    msg = str(err.value)
    assert str(path) in msg
    assert "shape mismatch (file vs model)" in msg
    assert "backbone.stem.0.weight [16, 3, 1, 5, 5] vs [8, 3, 1, 5, 5]" in msg
    assert "Fix:" in msg and "model.weights=null" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    """A deeper tiny3d's backbone has blocks this one lacks; the error lists them."""
    path = tmp_path / "deep.pt"
    torch.save(build_model(_cfg(depth=2), T, SIZE).backbone.state_dict(), path)
    model = build_model(_cfg(), T, SIZE)
    with pytest.raises(WeightsError, match="backbone 'tiny3d'") as err:
        load_weights(model, path)
    msg = str(err.value)
    assert "not in the model: layer1.1.spatial.weight [8, 8, 1, 3, 3]" in msg
    assert "0 missing" in msg


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    """A weights path that does not exist is named in the error."""
    path = tmp_path / "nowhere" / "r3d.pt"
    with pytest.raises(FileNotFoundError, match=r"nowhere/r3d\.pt"):
        build_model(_cfg(weights=str(path)), T, SIZE)


def test_a_file_that_is_not_a_state_dict_is_explained(tmp_path: Path) -> None:
    """A file holding something other than a tensor mapping fails with the file name."""
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="not a state_dict"):
        build_model(_cfg(weights=str(path)), T, SIZE)
    path.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="not a readable torch file"):
        build_model(_cfg(weights=str(path)), T, SIZE)
