"""Tiny3D: a small (2+1)D residual video CNN, the fast CPU default for the synthetic benchmark."""

from __future__ import annotations

import math

import torch
from torch import nn

from hdf.models.registry import register_backbone

NORMS = ("batch", "group")


def norm3d(kind: str, channels: int) -> nn.Module:
    """A 3D norm layer; ``group`` avoids BN running statistics that average badly across sources."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ValueError(f"unknown norm {kind!r}; use model.norm=batch or model.norm=group")


class Block2Plus1D(nn.Module):
    """Residual block: a 1x3x3 spatial conv (strided) then a 3x1x1 temporal conv; T is kept."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.spatial = nn.Conv3d(
            in_ch, out_ch, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False
        )
        self.norm1 = norm3d(norm, out_ch)
        self.temporal = nn.Conv3d(out_ch, out_ch, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.norm2 = norm3d(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, stride=(1, stride, stride), bias=False),
                norm3d(norm, out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.spatial(x)))
        out = self.norm2(self.temporal(out))
        return self.relu(out + self.shortcut(x))


class Tiny3D(nn.Module):
    """Stem plus four (2+1)D stages of widths w, 2w, 4w, 8w; each halves H and W, none touches T."""

    mean = (0.45, 0.45, 0.45)
    std = (0.225, 0.225, 0.225)

    def __init__(self, width: int = 16, depth: int = 1, norm: str = "batch") -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"tiny3d needs width >= 1 and depth >= 1, got {width=} {depth=}")
        self.stem = nn.Sequential(
            nn.Conv3d(3, width, (1, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2), bias=False),
            norm3d(norm, width),
            nn.ReLU(inplace=True),
        )
        self.stage_channels = [width, 2 * width, 4 * width, 8 * width]
        in_ch = width
        for i, out_ch in enumerate(self.stage_channels, start=1):
            blocks = [Block2Plus1D(in_ch, out_ch, 2, norm)]
            blocks += [Block2Plus1D(out_ch, out_ch, 1, norm) for _ in range(depth - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_ch = out_ch
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, len(self.stage_channels) + 1):
            x = getattr(self, f"layer{i}")(x)
        return x


@register_backbone("tiny3d")
def tiny3d(
    width: int, num_frames: int, size: int, *, depth: int = 1, norm: str = "batch", **kw: object
) -> Tiny3D:
    """Tiny3D, the fast CPU default (not in the paper).

    A stride-2 stem and four residual (2+1)D stages (widths w, 2w, 4w, 8w), each halving H and W and
    keeping T, so every DAM sees the full clip length as in the paper's X3D layout
    (``docs/hdf_method.md`` §R3). At w=16 it has about 0.4 M parameters.

    Args:
        width: channels of the first stage (w).
        num_frames: clip length T (kept by every stage; unused otherwise).
        size: input height and width (any size works; unused otherwise).
        depth: residual blocks per stage.
        norm: ``batch`` (BatchNorm3d) or ``group`` (GroupNorm, no running statistics).
        **kw: other model-config keys, ignored.

    Reference: the (2+1)D factorisation follows Tran et al., "A Closer Look at Spatiotemporal
    Convolutions for Action Recognition", CVPR 2018.
    """
    return Tiny3D(width=int(width), depth=int(depth), norm=norm)
