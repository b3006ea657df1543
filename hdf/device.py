"""Device, precision and seeding helpers, so every loop picks hardware and autocast the same way."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a config value: ``auto`` means CUDA when present, else the CPU."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={name!r} was asked for but CUDA is not available here; "
                "use device=auto or device=cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={name!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for fp32 (``auto``: bf16 on CUDA)."""
    precision = str(precision).strip().lower()
    if precision not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(_PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "auto":
        return torch.bfloat16 if device_type == "cuda" else None
    return _DTYPES.get(precision)


@contextlib.contextmanager
def autocast_context(device: torch.device | str, precision: str = "auto") -> Iterator[None]:
    """Autocast for the forward pass at the configured precision (a no-op for fp32)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def needs_grad_scaler(device: torch.device | str, precision: str = "auto") -> bool:
    """True when fp16 autocast on CUDA needs a GradScaler against underflowing gradients."""
    return (
        torch.device(device).type == "cuda" and autocast_dtype(device, precision) is torch.float16
    )


def set_deterministic(flag: bool) -> None:
    """Switch torch's deterministic algorithms on or off (tests, resume checks)."""
    flag = bool(flag)
    if flag:
        # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(flag, warn_only=True)
    torch.backends.cudnn.deterministic = flag
    torch.backends.cudnn.benchmark = not flag


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with `count` torch intra-op threads, then restore the previous count.

    CPU matmuls can round differently with the thread count (MKL splits the work by threads):
    a result that must not depend on which process computed it, such as a data split written
    to a shared cache, is computed with a fixed count. The count is per process: other threads
    of the process run with it while the block lasts.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one integer."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
