"""Initial weights from a local file (never a download); errors name the file and the fix."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from hdf.torchfile import UnreadableFileError, UnsafeFileError, load_torch_file

_SHOW = 5  # mismatched keys listed per kind in an error
_FULL_MODEL_PREFIXES = ("backbone.", "dam.", "head.")
_FIX = (
    "Fix: point model.weights at a state_dict saved from the same architecture (same "
    "model.backbone, model.width, model.norm and, for a whole-model file, the same model.dam "
    "settings and number of classes), e.g. torch.save(model.state_dict(), path) or a checkpoint "
    "dict with a 'model' key; or set model.weights=null to start from random initialisation."
)


class WeightsError(RuntimeError):
    """A weights file that cannot be read or does not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict stored in `path` (a bare state_dict or a checkpoint dict with ``model``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"model.weights={str(path)!r}: no such file ({file.resolve()}). Fix: give the path "
            "of a local state_dict file (.pt/.pth; nothing is ever downloaded), or set "
            "model.weights=null."
        )
    try:
        obj = load_torch_file(
            file,
            "Fix: save it with torch.save(model.state_dict(), path) (tensors only), or set "
            "model.weights=null.",
        )
    except (UnsafeFileError, UnreadableFileError) as err:
        raise WeightsError(f"model.weights: {err}") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"weights file {file} holds a {type(obj).__name__}, not a state_dict. " + _FIX
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"weights file {file} is not a state_dict: entries {bad[:_SHOW]} are not tensors. "
            + _FIX
        )
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _shape(t: torch.Tensor) -> str:
    """A shape as a short string for error messages."""
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_fits(module: nn.Module, state: Mapping[str, torch.Tensor], file: str, what: str) -> None:
    """Raise WeightsError listing missing, unexpected and mis-shaped keys if `state` won't load."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not (missing or unexpected or shapes):
        return
    lines = [
        f"weights file {file} does not fit {what}: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped key(s)."
    ]
    if shapes:
        lines.append(
            "  shape mismatch (file vs model): "
            + "; ".join(f"{k} {_shape(state[k])} vs {_shape(own[k])}" for k in shapes[:_SHOW])
        )
    if missing:
        lines.append(
            "  missing from the file: "
            + "; ".join(f"{k} {_shape(own[k])}" for k in missing[:_SHOW])
        )
    if unexpected:
        lines.append(
            "  not in the model: "
            + "; ".join(f"{k} {_shape(state[k])}" for k in unexpected[:_SHOW])
        )
    lines.append(_FIX)
    raise WeightsError("\n".join(lines))


def load_weights(model: nn.Module, path: str | Path) -> str:
    """Load `path` into the whole HDFNet (keys ``backbone.*``, ...) or into its backbone alone.

    Returns ``"model"`` or ``"backbone"``, saying which was loaded. A backbone-only file may carry
    the head of another task (e.g. torchvision's Kinetics ``fc.*``); the backbone's
    ``ignored_weight_prefixes`` are dropped. Loading is strict otherwise.
    """
    state = read_state_dict(path)
    name = getattr(model, "backbone_name", type(model).__name__)
    backbone = getattr(model, "backbone", None)
    if backbone is None or any(k.startswith(_FULL_MODEL_PREFIXES) for k in state):
        target, kind, what = model, "model", f"the whole HDFNet (backbone {name!r})"
    else:
        ignored = tuple(getattr(backbone, "ignored_weight_prefixes", ()))
        if ignored:
            state = {k: v for k, v in state.items() if not k.startswith(ignored)}
        target, kind, what = backbone, "backbone", f"backbone {name!r}"
    check_fits(target, state, str(Path(path).expanduser()), what)
    target.load_state_dict(state, strict=True)
    return kind
