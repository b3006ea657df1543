"""Source-aware strategies, built by name from the `strategy` config group."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from hdf.config.tree import group_node
from hdf.registry import Registry
from server.strategy.base import SourceFedAvg
from server.strategy.dro import DRO
from server.strategy.dro_math import DRO_MODES, DROSettings
from server.strategy.feddg_ga import FedDGGA
from server.strategy.local import LocalOnly
from server.strategy.qfedavg import QFedAvg
from server.strategy.sequential import SourceSequential
from server.strategy.server_opt import ServerOptimizer, ServerOptSettings

StrategyBuilder = Callable[..., SourceFedAvg]
STRATEGIES: Registry[StrategyBuilder] = Registry(
    "strategy", "pick a file in simulations/conf/strategy/ (strategy=<file>)"
)
# decorator: @register_strategy("fedavg") adds a builder `(cfg, **common) -> SourceFedAvg`
register_strategy = STRATEGIES.register
list_strategies = STRATEGIES.names


def build_strategy(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    """The strategy named by `cfg.name` (the `strategy` section, checked against its schema and
    completed with its defaults); `common` holds the run's sources, sizes and seed."""
    return STRATEGIES.lookup(cfg["name"])(group_node("strategy", cfg), **common)


def _source_fedavg_kwargs(cfg: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    common = dict(common)
    common.pop("source_sizes", None)
    common.pop("buffers", None)  # the model's buffer keys: only strategies that need them
    return {
        "fraction_train": float(cfg["fraction_train"]),
        "min_train_replies": int(cfg["min_train_replies"]),
        "proximal_mu": float(cfg["proximal_mu"]),
        "local_norm": str(cfg["local_norm"]),
        **common,
    }


@register_strategy("fedavg")
def _fedavg(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    return SourceFedAvg(**_source_fedavg_kwargs(cfg, common))


@register_strategy("fedprox")
def _fedprox(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    if float(cfg["proximal_mu"]) <= 0:
        raise ValueError("strategy=fedprox needs strategy.proximal_mu > 0")
    return SourceFedAvg(**_source_fedavg_kwargs(cfg, common))


@register_strategy("dro")
def _dro(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    d = cfg["dro"]
    # every numeric setting a mode reads: a new one is a schema key plus a DROSettings field
    settings = DROSettings(**{f.name: float(d[f.name]) for f in fields(DROSettings)})
    return DRO(
        mode=str(d["mode"]),
        settings=settings,
        prior=str(d["prior"]),
        source_sizes=common.get("source_sizes"),
        sample_by_lambda=d["sample_by_lambda"],
        loss=str(d["loss"]),
        estimate=d["estimate"],
        smoothing=float(d["smoothing"]),
        **_source_fedavg_kwargs(cfg, common),
    )


@register_strategy("qfedavg")
def _qfedavg(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    q = cfg["qfedavg"]
    lipschitz = q["lipschitz"]
    return QFedAvg(
        q=float(q["q"]),
        client_lr=float(q["client_lr"]),
        lipschitz=None if lipschitz is None else float(lipschitz),
        weighted_by_examples=bool(q["weighted_by_examples"]),
        **_source_fedavg_kwargs(cfg, common),
    )


@register_strategy("feddg_ga")
def _feddg_ga(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    g = cfg["feddg_ga"]
    return FedDGGA(
        step=float(g["step"]),
        num_rounds=int(g["num_rounds"]),
        **_source_fedavg_kwargs(cfg, common),
    )


@register_strategy("fedbn")
def _fedbn(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    """FedBN (Li et al., 2021): FedAvg whose sites keep all their normalisation layers local."""
    return SourceFedAvg(**{**_source_fedavg_kwargs(cfg, common), "local_norm": "all"})


@register_strategy("sequential")
def _sequential(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    """Sites train one after another on the model the previous one returned."""
    return SourceSequential(buffers=common.get("buffers", ()), **_source_fedavg_kwargs(cfg, common))


@register_strategy("local")
def _local(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    return LocalOnly(**_source_fedavg_kwargs(cfg, common))


__all__ = [
    "DRO",
    "DRO_MODES",
    "DROSettings",
    "FedDGGA",
    "LocalOnly",
    "QFedAvg",
    "ServerOptSettings",
    "ServerOptimizer",
    "SourceFedAvg",
    "SourceSequential",
    "build_strategy",
    "list_strategies",
    "register_strategy",
]
