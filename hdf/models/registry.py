"""The backbone registry: filled by a decorator, read by `build_model` and the tests.

A backbone is an ``nn.Module`` with a ``stem``, named stages (``layer1``..``layerN`` or a
ModuleList ``stages``), ``stage_channels`` (output channels per stage) and ``mean`` / ``std``
(per-channel input normalisation in [0, 1] units). Optional: ``neck`` (run after the last stage,
before pooling), ``feature_dim`` (pooled width when a neck changes it) and
``ignored_weight_prefixes`` (keys of a foreign head dropped when loading backbone weights).
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from hdf.registry import Registry


class BackboneBuilder(Protocol):
    """A registered builder: ``(width, num_frames, size, **kw) -> backbone module``."""

    def __call__(self, width: int, num_frames: int, size: int, **kw: object) -> nn.Module: ...


BACKBONES: Registry[BackboneBuilder] = Registry(
    "backbone", "set model.backbone=<name> or pick a file in simulations/conf/model/"
)
register_backbone = BACKBONES.register  # decorator: @register_backbone("tiny3d")
list_backbones = BACKBONES.names
get_backbone_builder = BACKBONES.lookup
