"""Load a trained model from a run folder or a checkpoint file, with the config it was trained with.

A run's ``checkpoint.pt`` (written by ``hdf.runfolder.folder.RunFolder.save_checkpoint``)
holds the model state_dict and the resolved run config as YAML text, so evaluating, predicting or
exporting needs only the checkpoint: the model is rebuilt from the config it carries,
never retyped by hand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from hdf.config import model_settings
from hdf.models import HDFNet, build_model
from hdf.runfolder.folder import CHECKPOINT_FILE
from hdf.torchfile import UnreadableFileError, UnsafeFileError, load_torch_file

CHECKPOINT_FIX = (
    "give a run folder or checkpoint.pt written by simulations.run or the ServerApp "
    "(files from elsewhere are never unpickled)"
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or lacks what a model needs; names the file."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's weights do not fit the model built from the given model config."""


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file of `path`: the file itself, or ``checkpoint.pt`` of a run folder."""
    p = Path(path)
    if p.is_dir():
        f = p / CHECKPOINT_FILE
        if not f.is_file():
            raise CheckpointError(
                f"{p} is a folder without {CHECKPOINT_FILE}: give a run folder (runs/<folder>) "
                "or a checkpoint file"
            )
        return f
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file or run folder")
    return p


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """(checkpoint dict, its file) for a run folder or a checkpoint file; loaded on the CPU."""
    f = resolve_checkpoint(path)
    try:
        ckpt = load_torch_file(f, CHECKPOINT_FIX)
    except (UnsafeFileError, UnreadableFileError) as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(
            f"{f}: not a run checkpoint (expected a dict with 'model' and 'config', as "
            "simulations.run writes); a bare state_dict carries no config to rebuild the model"
        )
    return ckpt, f


def checkpoint_config(ckpt: Mapping[str, Any], where: str | Path = "checkpoint") -> dict[str, Any]:
    """The resolved run config a checkpoint carries, as a plain dict."""
    text = ckpt.get("config")
    if not text:
        raise CheckpointError(
            f"{where}: the checkpoint carries no run config; it was not written by a run "
            "(simulations.run / the ServerApp), so the model it holds cannot be rebuilt"
        )
    cfg = yaml.safe_load(text) if isinstance(text, str) else dict(text)
    if not isinstance(cfg, dict) or "model" not in cfg or "data" not in cfg:
        raise CheckpointError(f"{where}: the config it carries has no 'model' or 'data' section")
    return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {"a.b.c": value}; lists stay values (compared whole)."""
    if not isinstance(cfg, Mapping):
        return {prefix.rstrip("."): cfg}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def config_diff(saved: Mapping[str, Any], given: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Lines ``key: checkpoint X, given Y`` for every flattened key whose value differs."""
    a, b = flatten(saved, prefix), flatten(given, prefix)
    missing = object()
    lines = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            sa = "(absent)" if va is missing else repr(va)
            sb = "(absent)" if vb is missing else repr(vb)
            lines.append(f"{k}: checkpoint {sa}, given {sb}")
    return lines


def state_dict_diff(
    saved: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], limit: int = 8
) -> list[str]:
    """Keys missing, unexpected or of another shape, at most `limit` named per kind."""
    lines = []
    missing = [k for k in model if k not in saved]
    extra = [k for k in saved if k not in model]
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(model[k].shape)}"
        for k in model
        if k in saved and tuple(saved[k].shape) != tuple(model[k].shape)
    ]
    for label, items in (
        ("in the model but not the checkpoint", missing),
        ("in the checkpoint but not the model", extra),
        ("of another shape (checkpoint vs model)", shapes),
    ):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"{len(items)} weight(s) {label}: {', '.join(items[:limit])}{more}")
    return lines


def load_model(
    path: str | os.PathLike[str],
    *,
    model_cfg: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[HDFNet, dict[str, Any]]:
    """(model in eval mode with the checkpoint's weights, the run config it carries).

    `model_cfg` replaces the checkpoint's model config (e.g. with command-line overrides); when the
    weights then do not fit, the error lists the config keys that differ and the weights affected.
    T and the input size are the checkpoint's ``data.num_frames`` and ``data.size``.
    """
    ckpt, f = read_checkpoint(path)
    cfg = checkpoint_config(ckpt, f)
    # The checkpoint replaces every weight, so a pretrained-weights file named in the config is
    # neither needed nor required to still exist.
    saved_model_cfg = {**cfg["model"], "weights": None}
    use_cfg = saved_model_cfg if model_cfg is None else {**dict(model_cfg), "weights": None}
    num_frames, size = int(cfg["data"]["num_frames"]), int(cfg["data"]["size"])
    try:
        model = build_model(model_settings(use_cfg), num_frames, size)
    except (ValueError, TypeError, RuntimeError) as err:
        diff = config_diff(saved_model_cfg, use_cfg, "model.")
        hint = f"; model config keys that differ from the checkpoint's: {'; '.join(diff)}"
        raise CheckpointMismatchError(
            f"{f}: cannot build the model ({err}){hint if diff else ''}"
        ) from None
    weights = ckpt["model"]
    problems = state_dict_diff(weights, model.state_dict())
    if problems:
        diff = config_diff(saved_model_cfg, use_cfg, "model.")
        if diff:
            why = (
                f"{f} was trained with another model config; keys that differ: {'; '.join(diff)}. "
                "Drop those model overrides: the checkpoint's own config builds the right model"
            )
        else:
            why = (
                f"{f}: its weights do not fit the model its own config builds "
                f"(backbone {saved_model_cfg.get('backbone')!r}); was the model code changed "
                "since the run?"
            )
        raise CheckpointMismatchError(f"{why}. {' | '.join(problems)}")
    model.load_state_dict(weights)
    model.to(device).eval()
    return model, cfg
