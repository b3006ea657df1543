"""The backbone registry: one dict filled by a decorator, read by `build_model` and the tests.

A backbone is an ``nn.Module`` with a ``stem``, named stages (``layer1``..``layerN`` or a
ModuleList ``stages``), ``stage_channels`` (output channels per stage) and ``mean`` / ``std``
(per-channel input normalisation in [0, 1] units). Optional: ``neck`` (run after the last stage,
before pooling), ``feature_dim`` (pooled width when a neck changes it) and
``ignored_weight_prefixes`` (keys of a foreign head dropped when loading backbone weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import nn


class BackboneBuilder(Protocol):
    """A registered builder: ``(width, num_frames, size, **kw) -> backbone module``."""

    def __call__(self, width: int, num_frames: int, size: int, **kw: object) -> nn.Module: ...


_BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator adding a backbone builder under `name` (a second use of a name is an error)."""

    def wrap(fn: BackboneBuilder) -> BackboneBuilder:
        if name in _BACKBONES and _BACKBONES[name] is not fn:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = fn
        return fn

    return wrap


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_BACKBONES)


def get_backbone_builder(name: str) -> BackboneBuilder:
    """The builder registered as `name`; an unknown name lists the known ones."""
    try:
        return _BACKBONES[name]
    except KeyError:
        known = ", ".join(list_backbones()) or "(none registered)"
        raise ValueError(
            f"unknown backbone {name!r}; known backbones: {known} "
            f"(set model.backbone=<name> or pick a file in simulations/conf/model/)"
        ) from None
