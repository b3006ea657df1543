"""The run configuration: its schema (`schema`) and how a config is composed and checked
(`compose`). Flower-free, so every layer (hdf, client, server, simulations) may import it."""

from hdf.config.schema import RunConfig
from hdf.config.tree import (
    CONF_DIR,
    ConfigError,
    compose,
    load,
    model_settings,
    settings,
    split_overrides,
    to_yaml,
)

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "RunConfig",
    "compose",
    "load",
    "model_settings",
    "settings",
    "split_overrides",
    "to_yaml",
]
