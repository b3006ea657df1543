"""X3D-S-style efficient 3D CNN (the paper's backbone family), written from the X3D paper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hdf.models.registry import register_backbone
from hdf.models.tiny3d import norm3d

_EXPANSION = 2.25  # bottleneck inner width = 2.25 x stage width (X3D, Table 1)
_SE_RATIO = 0.0625  # squeeze-excitation reduction (X3D uses SE on every other block)


def _se_width(channels: int) -> int:
    """SE hidden width: channels * 1/16, rounded to a multiple of 8, at least 8."""
    return max(8, int(channels * _SE_RATIO + 4) // 8 * 8)


class SqueezeExcite3d(nn.Module):
    """Channel gate from globally pooled features (Hu et al., CVPR 2018)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = _se_width(channels)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc1 = nn.Conv3d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv3d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(self.pool(x)))))


class X3DBlock(nn.Module):
    """Bottleneck: 1x1x1 expand, depthwise 3x3x3 (spatially strided), SE, Swish, 1x1x1 project."""

    def __init__(self, in_ch: int, out_ch: int, inner: int, stride: int, se: bool, norm: str):
        super().__init__()
        self.conv_a = nn.Conv3d(in_ch, inner, 1, bias=False)
        self.norm_a = norm3d(norm, inner)
        self.conv_b = nn.Conv3d(
            inner, inner, 3, stride=(1, stride, stride), padding=1, groups=inner, bias=False
        )
        self.norm_b = norm3d(norm, inner)
        self.se: nn.Module = SqueezeExcite3d(inner) if se else nn.Identity()
        self.swish = nn.SiLU(inplace=True)
        self.conv_c = nn.Conv3d(inner, out_ch, 1, bias=False)
        self.norm_c = norm3d(norm, out_ch)
        nn.init.zeros_(self.norm_c.weight)  # each block starts as its shortcut
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, stride=(1, stride, stride), bias=False),
                norm3d(norm, out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm_a(self.conv_a(x)))
        out = self.swish(self.se(self.norm_b(self.conv_b(out))))
        out = self.norm_c(self.conv_c(out))
        return self.relu(out + self.shortcut(x))


class X3D(nn.Module):
    """Stem (spatial conv, depthwise temporal conv), stages res2..res5, a 1x1x1 ``neck`` (conv5)."""

    mean = (0.45, 0.45, 0.45)
    std = (0.225, 0.225, 0.225)

    def __init__(self, width: int = 24, depths: Sequence[int] = (3, 5, 11, 7), norm: str = "batch"):
        super().__init__()
        if width < 1 or not depths or min(depths) < 1:
            raise ValueError(f"x3d needs width >= 1 and depths >= 1, got {width=} {depths=}")
        self.stem = nn.Sequential(
            nn.Conv3d(3, width, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
            nn.Conv3d(width, width, (5, 1, 1), padding=(2, 0, 0), groups=width, bias=False),
            norm3d(norm, width),
            nn.ReLU(inplace=True),
        )
        self.stage_channels = [width * 2**i for i in range(len(depths))]
        in_ch = width
        for i, (out_ch, depth) in enumerate(zip(self.stage_channels, depths, strict=True), 1):
            inner = int(_EXPANSION * out_ch)
            blocks = [
                X3DBlock(
                    in_ch if j == 0 else out_ch, out_ch, inner, 2 if j == 0 else 1, j % 2 == 0, norm
                )
                for j in range(depth)
            ]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_ch = out_ch
        self.feature_dim = int(_EXPANSION * in_ch)
        self.neck = nn.Sequential(
            nn.Conv3d(in_ch, self.feature_dim, 1, bias=False),
            norm3d(norm, self.feature_dim),
            nn.ReLU(inplace=True),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, len(self.stage_channels) + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.neck(x)


@register_backbone("x3d_s")
def x3d_s(
    width: int,
    num_frames: int,
    size: int,
    *,
    depths: Sequence[int] = (3, 5, 11, 7),
    norm: str = "batch",
    **kw: object,
) -> X3D:
    """X3D-S network (also X3D-XS and -M, which differ only in input size), the HDF backbone.

    Stage widths w, 2w, 4w, 8w (24, 48, 96, 192 at w=24), depths 3, 5, 11, 7, bottleneck expansion
    2.25, depthwise 3x3x3 convs, SE on every other block, Swish; T is kept at every stage, so each
    DAM sees the whole clip (``docs/hdf_method.md`` §R3). The features are the conv5
    output (2.25 x 8w = 432-d), pooled; X3D's extra 2048-d pre-logit layer is left out, since
    HDFNet's head is one linear layer. Key names differ from pytorchvideo's, so its pretrained
    files need converting before use as ``model.weights``.

    Args:
        width: channels of the first stage (24 in X3D).
        num_frames: clip length T (kept by every stage; unused otherwise).
        size: input height and width (unused).
        depths: bottleneck blocks per stage.
        norm: ``batch`` (BatchNorm3d) or ``group`` (GroupNorm).
        **kw: other model-config keys, ignored.

    Reference: Feichtenhofer, "X3D: Expanding Architectures for Efficient Video Recognition",
    CVPR 2020.
    """
    return X3D(width=int(width), depths=[int(d) for d in depths], norm=norm)
