"""The base optimiser of local training (AdamW or SGD + momentum) and its state between rounds.

Every round builds the optimiser afresh: its learning rate comes with the round and its
hyper-parameters with the config. What can survive a round is the per-parameter state only
(AdamW's step count and moment estimates, SGD's momentum buffer). It travels as flat named
tensors, ``"<parameter name>::<state key>"`` (what a Flower ArrayRecord holds), keyed by
parameter name so it is found again however the optimiser orders its parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd")
SEP = "::"


class OptimizerStateError(ValueError):
    """A kept optimiser state that does not fit the model (raised before any step is taken)."""


def _unwrapped(fn: Any) -> Any:
    """The function under torch's wrappers (dynamo's; the profiling hook torch sets on an
    optimiser class once one is built), or `fn` itself if torch stops marking them."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


class _Eager:
    """torch's own optimiser methods without their torch._dynamo wrappers (same numbers).

    torch 2.14 wraps `Optimizer.add_param_group`, `state_dict`, `load_state_dict` and
    `zero_grad` in `torch._disable_dynamo`, and every `step` in `_use_grad_for_differentiable`;
    each imports torch._dynamo (about 1.1-1.3 s of CPU) the first time it runs, only to keep
    torch.compile from tracing them. Nothing here compiles an optimiser, and every deployed
    message is a fresh ClientApp process that paid that import again. These call the same
    functions unwrapped; `step` runs under no_grad as the wrapper does for a non-differentiable
    optimiser.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _unwrapped(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _unwrapped(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _unwrapped(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _unwrapped(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure: Any = None) -> Any:
        mro = type(self).__mro__
        base = next(c for c in mro[mro.index(_Eager) + 1 :] if "step" in vars(c))
        with torch.no_grad():
            return _unwrapped(base.step)(self, closure)


class EagerAdamW(_Eager, torch.optim.AdamW):
    """torch.optim.AdamW without the torch._dynamo import (`_Eager`)."""


class EagerSGD(_Eager, torch.optim.SGD):
    """torch.optim.SGD without the torch._dynamo import (`_Eager`)."""


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD with momentum over the trainable parameters.

    Both update all parameters in one call instead of a Python loop over ~130 small tensors:
    AdamW fused (one kernel, the same update up to float rounding), SGD multi-tensor (`foreach`,
    bit-identical). PyTorch picks neither on CPU by itself; the loop cost ~4 % of a tiny3d step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return EagerAdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"train.momentum must be in [0, 1), got {momentum}")
        return EagerSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    raise ValueError(f"unknown train.optimizer {name!r}; use one of {list(OPTIMIZERS)}")


def _trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the order `build_optimizer` hands them over."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def export_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as CPU copies named ``"<param>::<key>"``."""
    names = _trainable_names(model)
    out: dict[str, torch.Tensor] = {}
    for idx, entries in optimizer.state_dict()["state"].items():
        for key, value in entries.items():
            if value is None:  # SGD without momentum keeps a None buffer
                continue
            t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            out[f"{names[idx]}{SEP}{key}"] = t.detach().to("cpu", copy=True)
    return out


def import_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, flat: Mapping[str, torch.Tensor]
) -> None:
    """Load state written by `export_state` into a freshly built optimiser of the same model.

    Every entry is checked before anything is loaded: it must name a trainable parameter, be a
    finite floating tensor, and have the parameter's shape (or be a scalar, such as ``step``).
    An OptimizerStateError names the first entry that does not fit; the optimiser is then untouched.
    """
    names = _trainable_names(model)
    index = {n: i for i, n in enumerate(names)}
    params = dict(model.named_parameters())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for full, value in flat.items():
        name, sep, key = full.rpartition(SEP)
        if not sep or name not in index:
            raise OptimizerStateError(
                f"optimiser state entry {full!r} names no trainable parameter"
            )
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise OptimizerStateError(f"optimiser state entry {full!r} is not a floating tensor")
        shape = params[name].shape
        if value.dim() != 0 and value.shape != shape:
            raise OptimizerStateError(
                f"optimiser state entry {full!r} has shape {tuple(value.shape)}, the parameter "
                f"{tuple(shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise OptimizerStateError(f"optimiser state entry {full!r} is not finite")
        # a copy: torch would otherwise step the caller's tensors in place
        state.setdefault(index[name], {})[key] = value.clone()
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
