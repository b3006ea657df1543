"""Export a trained HDFNet as a self-contained program: uint8 clips in, expression logits out.

Two formats, both loadable without this code base:
- ``export``: a ``torch.export`` ExportedProgram (``.pt2``, ``torch.export.load``); the batch size
  is dynamic, T, C, H and W are fixed and checked at call time (the current PyTorch path).
- ``torchscript``: ``torch.jit.trace`` (``.ts``, ``torch.jit.load``, also from C++ libtorch);
  deprecated upstream but still the format most C++ runtimes read. A trace does not check shapes,
  and it cannot serialise a custom ``torch.autograd.Function`` (DAM's fused descriptors use one),
  so for models with DAM it fails with `ExportError` unless DAM falls back to plain ops while
  tracing (``torch.jit.is_tracing()``).
ONNX is not offered: ``onnx``/``onnxscript`` are not dependencies of this project.
The preprocessing (scale, per-channel normalisation, B x T x C x H x W -> B x C x T x H x W) is part
of the exported program, so a user feeds raw face crops of the checkpoint's T and size.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hdf.classes import EMOTIONS
from hdf.models import HDFNet

FORMATS = ("export", "torchscript")
SUFFIX = {"export": ".pt2", "torchscript": ".ts"}


class ExportError(RuntimeError):
    """The model cannot be written in the requested format; the message names the alternative."""


class ClipClassifier(nn.Module):
    """uint8 clips B x T x 3 x size x size -> logits B x 7 (preprocessing included)."""

    def __init__(self, model: HDFNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(self.model.preprocess(clips))
        return logits


def metadata(model: HDFNet, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a user of the exported file needs to feed it and read its output."""
    return {
        "input": "uint8 clips B x T x 3 x H x W (RGB face crops, frames in time order)",
        "output": "logits B x 7; softmax gives the probability of each class",
        "num_frames": model.num_frames,
        "size": model.size,
        "classes": list(EMOTIONS),
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "backbone": model.backbone_name,
        **(extra or {}),
    }


def example_clips(model: HDFNet, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Random uint8 clips of the shape the model expects (used to trace and to check)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, model.num_frames, 3, model.size, model.size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def export_model(
    model: HDFNet,
    path: str | os.PathLike[str],
    fmt: str = "export",
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (CPU, eval mode) in format `fmt`; returns the file (``.pt2`` iff ``export``).

    The metadata (T, size, classes, normalisation) goes into the file as ``metadata.json``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if (path.suffix == SUFFIX["export"]) != (fmt == "export"):
        # the loader tells the formats apart by this suffix
        path = path.with_name(path.name + SUFFIX[fmt])
    model = model.to("cpu").eval()
    wrapper = ClipClassifier(model).eval()
    example = example_clips(model)
    meta = json.dumps(metadata(model, extra_meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "export":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.export.export(wrapper, (example,), dynamic_shapes={"clips": {0: batch}})
            torch.export.save(program, path, extra_files={"metadata.json": meta})
        else:
            try:
                with warnings.catch_warnings():
                    # tracing and jit.save are deprecated upstream, and the trace warns about
                    # shape checks it turns into constants; the file is checked against the
                    # eager model instead.
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(wrapper, (example,), check_trace=False)
                    torch.jit.save(traced, str(path), _extra_files={"metadata.json": meta})
            except RuntimeError as err:
                if "Python function call" not in str(err):
                    raise
                # A custom autograd.Function (DAM's fused descriptors) is a Python call that a
                # trace records but cannot serialise.
                first = str(err).strip().splitlines()[0]
                raise ExportError(
                    "TorchScript cannot serialise this model: it calls a Python autograd function "
                    f"({first}); use --format export (torch.export), which handles it"
                ) from None
    return path


def load_exported(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """(callable clips -> logits, metadata) of a file written by `export_model`."""
    path = Path(path)
    files = {"metadata.json": ""}
    if path.suffix == SUFFIX["export"]:
        program = torch.export.load(path, extra_files=files)
        fn = program.module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            fn = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    meta = json.loads(files["metadata.json"] or "{}")
    return fn, meta


@torch.no_grad()
def max_logit_difference(model: HDFNet, exported: Any, batches: tuple[int, ...] = (1, 3)) -> float:
    """Largest |logit difference| between the eager model and the exported one on random clips."""
    model = model.to("cpu").eval()
    wrapper = ClipClassifier(model).eval()
    worst = 0.0
    for i, b in enumerate(batches):
        clips = example_clips(model, batch=b, seed=100 + i)
        worst = max(worst, float((exported(clips) - wrapper(clips)).abs().max()))
    return worst
