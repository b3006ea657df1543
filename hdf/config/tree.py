"""Compose and check run configs against the schema; one-line errors naming the key.

`compose` is Hydra's composition of the presets in `simulations/conf/` on top of the dataclasses
of `hdf.config.schema`, registered in Hydra's ConfigStore. `load` checks a tree that arrives as
text (a run folder's config.yaml, a checkpoint's config, the run config a client receives) against
the same schema, picking each group's class by its kind. Either way an unknown key or a value of
the wrong type raises `ConfigError`: one line with the key, the nearest valid key where there is
one, and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import shlex
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from hdf.config.schema import (
    DATA_KINDS,
    MODEL_KINDS,
    RENAMED,
    STRATEGY_KINDS,
    ModelConfig,
    RunConfig,
)

log = logging.getLogger(__name__)

# The presets (data, not code): YAML files Hydra reads on top of the schema.
CONF_DIR = Path(__file__).resolve().parents[2] / "simulations" / "conf"
# group -> (the key naming the kind, what a kind is, kind -> schema class)
GROUP_KINDS: dict[str, tuple[str, str, Mapping[str, type]]] = {
    "model": ("backbone", "backbone", MODEL_KINDS),
    "data": ("name", "dataset", DATA_KINDS),
    "strategy": ("name", "strategy", STRATEGY_KINDS),
}


class ConfigError(ValueError):
    """A config key that does not exist or a value of the wrong type; one line, names the key."""


def register() -> None:
    """Put the schema in Hydra's ConfigStore: `run_schema`, and each group class by its name
    (`model/Tiny3DModel`, `data/SyntheticData`, ...), which each preset lists first."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, (_, _, kinds) in GROUP_KINDS.items():
        for cls in set(kinds.values()):
            cs.store(group=group, name=cls.__name__, node=cls)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The checked, resolved config for `overrides` (Hydra syntax: ``["experiment=smoke"]``)."""
    register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise explain(err) from None
    except Exception as err:  # Hydra wraps OmegaConf's error; unwrap it if there is one
        found = _omegaconf_cause(err)
        if found is None:
            raise
        raise explain(found, _where(err)) from None
    # Hydra lets `+key=value` add keys even to a structured config: check the result again.
    return load(OmegaConf.to_container(cfg), "")  # type: ignore[arg-type]


def load(
    tree: Mapping[str, Any] | str, where: str = "", *, drop_unknown: bool = False
) -> DictConfig:
    """A run config given as YAML text or a plain tree, checked against the schema.

    Keys missing from it take the schema's defaults (a run written before a key existed). A key
    the schema does not know, or a wrong type, raises `ConfigError` naming `where`; with
    `drop_unknown` (reading what an older version stored, e.g. to score its checkpoint) unknown
    keys are left out with a warning naming them (and the key that replaced a renamed one).
    """
    plain = OmegaConf.to_container(OmegaConf.create(tree)) if isinstance(tree, str) else tree
    if not isinstance(plain, Mapping):
        raise ConfigError(
            f"{where or 'config'}: a run config is a mapping, got {type(plain).__name__}"
        )
    if drop_unknown:
        dropped: list[str] = []
        plain = _known_keys(plain, RunConfig, "", dropped, where)
        if dropped:
            log.warning("%s: left out keys this version does not know: %s", where, dropped)
    cfg = OmegaConf.structured(RunConfig)
    try:
        for group in GROUP_KINDS:
            node = plain.get(group)
            if node is not None:  # typed by its kind first, so its own keys are known
                cfg[group] = OmegaConf.structured(kind_schema(group, node, where))
        cfg.merge_with(plain)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise explain(err, where) from None
    return cfg


def _known_keys(node: Any, cls: type, prefix: str, dropped: list[str], where: str) -> Any:
    """`node` without the keys schema class `cls` (recursively) does not have; names them."""
    if not isinstance(node, Mapping) or not dataclasses.is_dataclass(cls):
        return node
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if k not in hints:
            dropped.append(f"{key} (now {RENAMED[key].split()[0]})" if key in RENAMED else key)
            continue
        sub = hints[k]
        if not prefix and k in GROUP_KINDS and isinstance(v, Mapping):
            sub = kind_schema(k, v, where)
        out[k] = _known_keys(v, _dataclass_in(sub), f"{key}.", dropped, where)
    return out


def _dataclass_in(hint: Any) -> Any:
    """The dataclass of a field's type hint (``X`` or ``X | None``), else the hint itself."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)


def kind_schema(group: str, node: Any, where: str = "") -> type:
    """The schema class of a `group` node (a data, model or strategy section) by its kind."""
    key, noun, kinds = GROUP_KINDS[group]
    kind = node.get(key) if isinstance(node, Mapping) else None
    if kind not in kinds:
        at = f" in {where}" if where else ""
        raise ConfigError(
            f"unknown {noun} {kind!r} ({group}.{key}{at}); known: {', '.join(sorted(kinds))} "
            f"(pick a file in {CONF_DIR.name}/{group}/)"
        )
    return kinds[kind]


def group_node(group: str, node: Mapping[str, Any]) -> DictConfig:
    """A model, data or strategy section checked against its kind's schema, defaults filled
    in (a composed section is returned as it is)."""
    if isinstance(node, DictConfig):
        t = OmegaConf.get_type(node)
        if isinstance(t, type) and issubclass(t, tuple(set(GROUP_KINDS[group][2].values()))):
            return node
        node = OmegaConf.to_container(node)  # type: ignore[assignment]
    cfg = OmegaConf.structured(kind_schema(group, node))
    try:
        cfg.merge_with(node)
    except OmegaConfBaseException as err:
        raise explain(err, prefix=f"{group}.") from None
    return cfg


def model_settings(node: Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """Typed model settings from a model section: a composed one, or a plain mapping (a
    checkpoint's, a test's) checked against its backbone's schema, missing keys defaulted."""
    if isinstance(node, ModelConfig):
        return node
    out = OmegaConf.to_object(group_node("model", node))
    assert isinstance(out, ModelConfig)
    return out


def settings(cfg: DictConfig) -> RunConfig:
    """The run's typed settings (dataclasses) for `hdf` calls; `cfg` from `compose` or `load`."""
    if OmegaConf.get_type(cfg) is not RunConfig:
        cfg = load(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    out = OmegaConf.to_object(cfg)
    assert isinstance(out, RunConfig)
    return out


def explain(err: OmegaConfBaseException, where: str = "", prefix: str = "") -> ConfigError:
    """OmegaConf's multi-line error as one line: the key, what is wrong, the nearest valid key."""
    key = prefix + str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")
    at = f" ({where})" if where else ""
    if isinstance(err, ConfigKeyError | ConfigAttributeError) and key:
        if key in RENAMED:
            return ConfigError(f"{key}{at} was replaced by {RENAMED[key]}")
        parent, _, leaf = key.rpartition(".")
        valid = [f.name for f in dataclasses.fields(err.object_type)] if _is_dc(err) else []
        near = difflib.get_close_matches(leaf, valid, n=1)
        if near:
            return ConfigError(
                f"unknown config key {key}{at}; did you mean {parent + '.' if parent else ''}"
                f"{near[0]}?"
            )
        known = f"; known keys here: {', '.join(valid)}" if valid else ""
        return ConfigError(f"unknown config key {key}{at}{known}")
    if isinstance(err, ValidationError) and key:
        what = str(err).splitlines()[0]
        return ConfigError(f"{key}{at}: {what}")
    return ConfigError(" ".join(f"{where}: {err}".split()) if where else " ".join(str(err).split()))


def _is_dc(err: OmegaConfBaseException) -> bool:
    t = getattr(err, "object_type", None)
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _omegaconf_cause(err: BaseException) -> OmegaConfBaseException | None:
    """The OmegaConf error (with the key) Hydra's exception was raised from, if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _where(err: BaseException) -> str:
    """The preset file Hydra was merging when its message names one (``In 'experiment/x':``)."""
    text = str(err)
    if text.startswith("In '") and "':" in text:
        name = text[4:].split("'", 1)[0]
        return f"in {CONF_DIR.name}/{name}.yaml"
    return ""


def split_overrides(text: str) -> list[str]:
    """Overrides given as one string (the `overrides` run-config key of `flwr run`)."""
    return shlex.split(text)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
