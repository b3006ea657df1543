"""torchvision's video ResNets (R3D-18, MC3-18, R(2+1)D-18) as HDF backbones, never downloaded."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hdf.models.registry import register_backbone
from hdf.models.tiny3d import norm3d

# Kinetics-400 statistics of torchvision's VideoClassification preset, so local copies of its
# weights see the inputs they were trained on.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def swap_batchnorm(module: nn.Module, norm: str) -> nn.Module:
    """Replace every BatchNorm3d in `module` by the chosen norm (in place; ``batch`` keeps them)."""
    if norm == "batch":
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm3d):
            setattr(module, name, norm3d(norm, child.num_features))
        else:
            swap_batchnorm(child, norm)
    return module


def _video_resnet(name: str, norm: str) -> nn.Module:
    """A torchvision VideoResNet without weights, its head dropped, annotated as an HDF backbone.

    torchvision is imported here, not at module load: importing it costs seconds of CPU, and a
    deployed SuperNode starts a fresh ClientApp process for every message.
    """
    from torchvision.models import video as tv_video

    factory: Callable[..., nn.Module] = getattr(tv_video, name)
    net = factory(weights=None)  # never download: initial weights come from model.weights
    net.fc = nn.Identity()  # HDFNet owns pooling and the num_classes head
    net.stage_channels = [64, 128, 256, 512]
    net.mean = KINETICS_MEAN
    net.std = KINETICS_STD
    net.ignored_weight_prefixes = ("fc.",)  # a Kinetics-400 head in a local weights file
    return swap_batchnorm(net, norm)


@register_backbone("r3d_18")
def r3d_18(
    width: int, num_frames: int, size: int, *, norm: str = "batch", **kw: object
) -> nn.Module:
    """torchvision R3D-18: full 3x3x3 convolutions; layers 2-4 halve T, H and W.

    Args:
        width: ignored (the architecture's widths are fixed: 64, 128, 256, 512).
        num_frames: clip length T (unused; HDFNet measures each stage's T).
        size: input height and width (unused).
        norm: ``batch`` (torchvision's BatchNorm3d) or ``group`` (swapped for GroupNorm).
        **kw: other model-config keys, ignored.

    Reference: Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition",
    CVPR 2018; the baseline backbone of M3DFEL, on which HDF's training code is built.
    """
    return _video_resnet("r3d_18", norm)


@register_backbone("mc3_18")
def mc3_18(
    width: int, num_frames: int, size: int, *, norm: str = "batch", **kw: object
) -> nn.Module:
    """torchvision MC3-18: 3D convolutions in the stem and layer1, 2D (1x3x3) in layers 2-4.

    Args:
        width: ignored (the architecture's widths are fixed: 64, 128, 256, 512).
        num_frames: clip length T (unused; T is kept by every stage).
        size: input height and width (unused).
        norm: ``batch`` (torchvision's BatchNorm3d) or ``group`` (swapped for GroupNorm).
        **kw: other model-config keys, ignored.

    Reference: Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition",
    CVPR 2018.
    """
    return _video_resnet("mc3_18", norm)


@register_backbone("r2plus1d_18")
def r2plus1d_18(
    width: int, num_frames: int, size: int, *, norm: str = "batch", **kw: object
) -> nn.Module:
    """torchvision R(2+1)D-18: each 3D conv factorised into a spatial and a temporal conv.

    Args:
        width: ignored (the architecture's widths are fixed: 64, 128, 256, 512).
        num_frames: clip length T (unused; HDFNet measures each stage's T).
        size: input height and width (unused).
        norm: ``batch`` (torchvision's BatchNorm3d) or ``group`` (swapped for GroupNorm).
        **kw: other model-config keys, ignored.

    Reference: Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition",
    CVPR 2018.
    """
    return _video_resnet("r2plus1d_18", norm)
