"""Video backbones, the HDFNet wrapper (DAM after each stage) and the backbone registry."""

from hdf.models import resnet3d, tiny3d, x3d  # noqa: F401  (registers the backbones)
from hdf.models.hdf_net import HDFNet, build_model
from hdf.models.registry import get_backbone_builder, list_backbones, register_backbone

__all__ = ["HDFNet", "build_model", "get_backbone_builder", "list_backbones", "register_backbone"]
