"""HDFNet: a registered video backbone, a DAM after each stage, pooled features, a linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hdf.config.schema import ModelConfig
from hdf.models.dsu import FeatureStatsNoise
from hdf.models.registry import get_backbone_builder

# Normalisation layers: FedBN keeps them local, TENT (hdf/adapt.py) adapts their affine parameters.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def backbone_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's stages in order, named ``layer1``.. (or ``stage1``.. for a ModuleList)."""
    stages = getattr(backbone, "stages", None)
    if isinstance(stages, nn.ModuleList):
        return [(f"stage{i}", m) for i, m in enumerate(stages, start=1)]
    found = []
    i = 1
    while isinstance(getattr(backbone, f"layer{i}", None), nn.Module):
        found.append((f"layer{i}", getattr(backbone, f"layer{i}")))
        i += 1
    if not found or not isinstance(getattr(backbone, "stem", None), nn.Module):
        raise TypeError(
            f"{type(backbone).__name__} is not an HDF backbone: it needs a `stem` module and "
            "stages `layer1`..`layerN` (or an nn.ModuleList `stages`)"
        )
    return found


def _channels_last_3d(module: nn.Module) -> None:
    """Store every 5-D parameter and buffer channels-last (4-D ones, e.g. DAM's 2D conv, stay)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.dim() == 5:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)


class HDFNet(nn.Module):
    """Backbone stem, stages each followed by a DAM (docs/hdf_method.md §R3), average pool, FC head.

    Args:
        backbone: a registered backbone (``stem``, stages, ``stage_channels``, ``mean``, ``std``).
        num_frames: clip length T the model is built for (DAM's temporal maps depend on it).
        size: height and width inputs are resized to.
        num_classes: number of expression classes.
        dam_stages: per stage, True to insert a DAM after it.
        dam_temporal: DAM's temporal branch on.
        dam_frequency: DAM's frequency branch on.
        dropout: dropout before the head.
        channels_last: keep 5-D weights and inputs in channels-last-3D memory format.
        backbone_name: registry name, used in error messages.
        dsu: probability of DSU's feature-statistics resampling after the stem and every stage
            but the last (``hdf/models/dsu.py``); 0 is off.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_frames: int,
        size: int,
        num_classes: int = 7,
        *,
        dam_stages: Sequence[bool] | None = None,
        dam_temporal: bool = True,
        dam_frequency: bool = True,
        dropout: float = 0.0,
        channels_last: bool = False,
        backbone_name: str = "",
        dsu: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_name = backbone_name or type(backbone).__name__
        self.num_frames = int(num_frames)
        self.size = int(size)
        self.num_classes = int(num_classes)
        self.channels_last = bool(channels_last)
        self.stage_names = [name for name, _ in backbone_stages(backbone)]
        self.stage_channels = [int(c) for c in backbone.stage_channels]
        if len(self.stage_channels) != len(self.stage_names):
            raise ValueError(
                f"backbone {self.backbone_name!r} reports {len(self.stage_channels)} "
                f"stage_channels for {len(self.stage_names)} stages"
            )
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 1, -1, 1, 1), False)

        # The temporal length (and width) each stage outputs, measured once: DAM is built per T.
        shapes = self._probe_shapes()
        stage_shapes = shapes[:-1]
        self.stage_frames = [t for _, t in stage_shapes]
        for name, want, (got, _) in zip(
            self.stage_names, self.stage_channels, stage_shapes, strict=True
        ):
            if want != got:
                raise ValueError(
                    f"backbone {self.backbone_name!r}: stage {name} outputs {got} channels but "
                    f"stage_channels says {want}"
                )
        self.feature_dim = shapes[-1][0]

        if dam_stages is None:
            dam_stages = [True] * len(self.stage_names)
        dam_stages = [bool(s) for s in dam_stages]
        if len(dam_stages) != len(self.stage_names):
            raise ValueError(
                f"model.dam.stages has {len(dam_stages)} entries but backbone "
                f"{self.backbone_name!r} has {len(self.stage_names)} stages "
                f"({', '.join(self.stage_names)}); give one true/false per stage or null for all"
            )
        self.dam = nn.ModuleDict()
        if any(dam_stages):
            from hdf.models.dam import DAM  # imported only when used

            for name, on, ch, t in zip(
                self.stage_names, dam_stages, self.stage_channels, self.stage_frames, strict=True
            ):
                if on:
                    self.dam[name] = DAM(ch, t, temporal=dam_temporal, frequency=dam_frequency)

        self.dsu = FeatureStatsNoise(dsu)  # no parameters: the state dict is unchanged
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(float(dropout))
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        if self.channels_last:
            _channels_last_3d(self)

    @torch.no_grad()
    def _probe_shapes(self) -> list[tuple[int, int]]:
        """(channels, frames) after each stage and after the neck, from one dummy forward."""
        was_training = self.backbone.training
        self.backbone.eval()  # keep BatchNorm running statistics untouched
        x = torch.zeros(1, 3, self.num_frames, self.size, self.size)
        x = x.to(next(self.backbone.parameters()).device)
        shapes = []
        x = self.backbone.stem(x)
        for _, stage in backbone_stages(self.backbone):
            x = stage(x)
            shapes.append((int(x.shape[1]), int(x.shape[2])))
        neck = getattr(self.backbone, "neck", None)
        if neck is not None:
            x = neck(x)
        shapes.append((int(x.shape[1]), int(x.shape[2])))
        self.backbone.train(was_training)
        return shapes

    def preprocess(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 clips B x T x C x H x W to normalised float B x C x T x size x size (own stats)."""
        if clips.dtype != torch.uint8:
            raise TypeError(f"preprocess expects uint8 clips B x T x C x H x W, got {clips.dtype}")
        if clips.dim() == 4:
            clips = clips.unsqueeze(0)
        if clips.dim() != 5 or clips.shape[2] not in (1, 3):
            raise ValueError(
                "preprocess expects clips B x T x C x H x W with C = 3 (or 1), "
                f"got {tuple(clips.shape)}"
            )
        b, t, c, h, w = clips.shape
        x = clips.to(self.mean.device).float().div_(255.0)
        if c == 1:
            x = x.expand(b, t, 3, h, w)
        if (h, w) != (self.size, self.size):
            x = F.interpolate(
                x.reshape(b * t, 3, h, w),
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=min(h, w) > self.size,
            ).view(b, t, 3, self.size, self.size)
        x = ((x - self.mean) / self.std).permute(0, 2, 1, 3, 4)
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def _trunk(self, x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Stem, then each stage and its DAM; appends every stage's output to `keep` if given."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"HDFNet expects B x 3 x T x H x W, got {tuple(x.shape)}")
        if len(self.dam) and x.shape[2] != self.num_frames:
            raise ValueError(
                f"this HDFNet was built for T={self.num_frames} frames (DAM is sized per T), got "
                f"T={x.shape[2]}; sample clips with data.num_frames={self.num_frames} or rebuild"
            )
        x = self.dsu(self.backbone.stem(x))
        last = self.stage_names[-1]
        for name, stage in backbone_stages(self.backbone):
            x = stage(x)
            if name != last:
                x = self.dsu(x)
            if name in self.dam:
                x = self.dam[name](x)
            if keep is not None:
                keep.append(x)
        neck = getattr(self.backbone, "neck", None)
        return neck(x) if neck is not None else x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits B x num_classes, pooled features B x feature_dim) for a preprocessed batch."""
        features = self.pool(self._trunk(x)).flatten(1)
        return self.head(self.dropout(features)), features

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output after its DAM (if any), for inspection and tests."""
        keep: list[torch.Tensor] = []
        self._trunk(x, keep)
        return keep

    def norm_state_keys(self) -> list[str]:
        """state_dict keys of normalisation layers (FedBN keeps these local)."""
        return norm_state_keys(self)


NORM_PARTS = ("all", "stats")


def norm_state_keys(module: nn.Module, part: str = "all") -> list[str]:
    """state_dict keys of the normalisation layers of `module`.

    `part="all"`: parameters and running statistics (FedBN keeps these local); `"stats"`: only
    the buffers (running mean/var and the batch counter), which SiloBN keeps local while the
    affine parameters are shared.
    """
    if part not in NORM_PARTS:
        raise ValueError(f"unknown normalisation part {part!r}; choose one of {NORM_PARTS}")
    keys = []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, NORM_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            names = dict(mod.named_buffers(recurse=False)) if part == "stats" else None
            keys += [
                prefix + k for k in mod.state_dict(keep_vars=True) if names is None or k in names
            ]
    return keys


def build_model(
    settings: ModelConfig, num_frames: int, size: int, num_classes: int = 7, *, init: bool = True
) -> HDFNet:
    """An HDFNet from the run's typed ``model`` settings (`hdf.config.model_settings` makes them
    from a mapping): the backbone's own keys go to its builder, DAM after the stages chosen.

    `init=False` skips the weight initialisation and `settings.weights` (`hdf.models.no_init`):
    only for a model whose whole state a strict `load_state_dict` overwrites next.

    Reference: HDF (Cui et al., ACM MM 2025), ``docs/hdf_method.md`` §R3: DAM after each stage.
    """
    if not init:
        from hdf.models.no_init import no_weight_init

        with no_weight_init():
            return _build(settings, num_frames, size, num_classes)
    model = _build(settings, num_frames, size, num_classes)
    if settings.weights:
        from hdf.models.weights import load_weights

        load_weights(model, settings.weights)
    return model


def _build(settings: ModelConfig, num_frames: int, size: int, num_classes: int) -> HDFNet:
    builder = get_backbone_builder(settings.backbone)
    backbone = builder(
        settings.width, int(num_frames), int(size), norm=settings.norm, **settings.backbone_kwargs()
    )
    dam = settings.dam
    n_stages = len(backbone_stages(backbone))
    if not dam.enabled:
        dam_stages: list[bool] | None = [False] * n_stages
    elif dam.stages is None:
        dam_stages = None
    else:
        dam_stages = [bool(s) for s in dam.stages]
    return HDFNet(
        backbone,
        num_frames,
        size,
        num_classes,
        dam_stages=dam_stages,
        dam_temporal=dam.temporal,
        dam_frequency=dam.frequency,
        dropout=settings.dropout,
        channels_last=settings.channels_last,
        backbone_name=settings.backbone,
        dsu=settings.dsu,
    )
