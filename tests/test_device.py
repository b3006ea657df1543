"""Device choice, autocast precision, determinism and seeding helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hdf.device import (
    autocast_context,
    autocast_dtype,
    needs_grad_scaler,
    resolve_device,
    seed_everything,
    set_deterministic,
)

HAS_CUDA = torch.cuda.is_available()


def test_auto_picks_cuda_when_present_else_cpu() -> None:
    """device=auto means CUDA where there is one, otherwise the CPU."""
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_explained() -> None:
    """Asking for CUDA on a CPU machine fails with the fix."""
    with pytest.raises(RuntimeError, match="device=auto or device=cpu"):
        resolve_device("cuda")


def test_unknown_device_is_explained() -> None:
    """A misspelt device names the accepted values."""
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda'"):
        resolve_device("gpu0")


def test_autocast_dtype_per_precision() -> None:
    """auto is bf16 on CUDA and fp32 on CPU; explicit settings are honoured on either."""
    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cuda", "auto") is torch.bfloat16
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert autocast_dtype("cuda", "fp16") is torch.float16
    assert autocast_dtype("cuda", "fp32") is None
    assert needs_grad_scaler("cuda", "fp16") and not needs_grad_scaler("cuda", "bf16")
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        autocast_dtype("cpu", "half")


def test_autocast_context_on_cpu() -> None:
    """bf16 casts matmuls inside the context; fp32 and auto on CPU leave them in float32."""
    a = torch.randn(4, 4)
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    for precision in ("fp32", "auto"):
        with autocast_context("cpu", precision):
            assert (a @ a).dtype == torch.float32


def test_seed_everything_repeats_every_generator() -> None:
    """The same seed gives the same draws from Python, NumPy and torch."""

    def draw() -> tuple:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first


def test_set_deterministic_toggles_torch() -> None:
    """The flag switches torch's deterministic algorithms on and back off."""
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_auto_on_gpu_uses_cuda_and_bf16() -> None:
    """On a GPU machine auto resolves to CUDA and autocasts to bf16."""
    device = resolve_device("auto")
    assert device.type == "cuda"
    a = torch.randn(8, 8, device=device)
    with autocast_context(device, "auto"):
        assert (a @ a).dtype == torch.bfloat16
