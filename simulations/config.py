"""Compose the one Hydra config tree; used by every entry point and by the ServerApp."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config for `overrides` (Hydra syntax, e.g. ``["experiment=smoke"]``)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def split_overrides(text: str) -> list[str]:
    """Overrides given as one string (the `overrides` run-config key of `flwr run`)."""
    import shlex

    return shlex.split(text)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml(text: str) -> DictConfig:
    cfg = OmegaConf.create(text)
    assert isinstance(cfg, DictConfig)
    return cfg
