"""Building a model without its weight initialisation, for a model whose every parameter and
buffer a strict state load overwrites at once (a site loading the weights the server sent).

Initialising r3d_18's 33M weights costs ~0.2-0.5 CPU s, and a deployed site builds its model
afresh for every message (Flower starts a new ClientApp process each time). Modules draw their
initial weights through `torch.nn.init`'s in-place initialisers (the layers' `reset_parameters`,
torchvision's and our backbones' init loops); inside `no_weight_init` those return the tensor
untouched, so parameters keep the uninitialised memory `torch.empty` gave them. Everything else
runs as usual: buffers made by tensor factories (BatchNorm's statistics, DAM's DCT bank,
HDFNet's non-persistent input mean and std) and anything computed in `__init__`. A model built
so holds garbage until its state is loaded: only `build_model(..., init=False)` uses it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# every public in-place initialiser of torch.nn.init (torch 2.x)
INITIALISERS = (
    "constant_",
    "dirac_",
    "eye_",
    "kaiming_normal_",
    "kaiming_uniform_",
    "normal_",
    "ones_",
    "orthogonal_",
    "sparse_",
    "trunc_normal_",
    "uniform_",
    "xavier_normal_",
    "xavier_uniform_",
    "zeros_",
)
# the initialisers are module globals: one build at a time replaces them
_LOCK = threading.Lock()


def _untouched(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


@contextmanager
def no_weight_init() -> Iterator[None]:
    """`torch.nn.init`'s in-place initialisers do nothing inside this block (process-wide, so a
    model built meanwhile in another thread would be uninitialised too; none is here)."""
    with _LOCK:
        saved = {name: getattr(torch.nn.init, name) for name in INITIALISERS}
        try:
            for name in INITIALISERS:
                setattr(torch.nn.init, name, _untouched)
            yield
        finally:
            for name, fn in saved.items():
                setattr(torch.nn.init, name, fn)
