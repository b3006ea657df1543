"""Source-aware strategies, built by name from the `strategy` config group."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hdf.registry import Registry
from server.strategy.base import SourceFedAvg
from server.strategy.dro import DRO
from server.strategy.dro_math import DRO_MODES, DROSettings
from server.strategy.feddg_ga import FedDGGA
from server.strategy.local import LocalOnly
from server.strategy.qfedavg import QFedAvg
from server.strategy.server_opt import ServerOptimizer, ServerOptSettings

StrategyBuilder = Callable[..., SourceFedAvg]
STRATEGIES: Registry[StrategyBuilder] = Registry(
    "strategy", "pick a file in simulations/conf/strategy/ (strategy=<file>)"
)
# decorator: @register_strategy("fedavg") adds a builder `(cfg, **common) -> SourceFedAvg`
register_strategy = STRATEGIES.register
list_strategies = STRATEGIES.names


def build_strategy(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    """The strategy named by `cfg.name`; `common` holds the run's sources, sizes and seed."""
    return STRATEGIES.lookup(cfg["name"])(cfg, **common)


def _fedavg_kwargs(cfg: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    common = dict(common)
    common.pop("source_sizes", None)
    return {
        "fraction_train": float(cfg.get("fraction_train", 1.0)),
        "min_train_replies": int(cfg.get("min_train_replies", 1)),
        "proximal_mu": float(cfg.get("proximal_mu", 0.0)),
        "local_norm": str(cfg.get("local_norm", "none")),
        **common,
    }


@register_strategy("fedavg")
def _fedavg(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    return SourceFedAvg(**_fedavg_kwargs(cfg, common))


@register_strategy("fedprox")
def _fedprox(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    if float(cfg.get("proximal_mu", 0.0)) <= 0:
        raise ValueError("strategy=fedprox needs strategy.proximal_mu > 0")
    return SourceFedAvg(**_fedavg_kwargs(cfg, common))


@register_strategy("dro")
def _dro(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    d = cfg["dro"]
    if float(d.get("server_lr", 1.0)) != 1.0:  # configs written before server_opt existed
        raise ValueError(
            f"strategy.dro.server_lr={d['server_lr']} is now server_opt.lr (with "
            "server_opt.name=none the new model is old + lr * (mix - old), as before); it "
            "applies to every strategy"
        )
    settings = DROSettings(
        eta=float(d["eta"]),
        eps=float(d["eps"]),
        cap=float(d["cap"]),
        loss_clip=float(d["loss_clip"]),
        tau=float(d.get("tau", 1.0)),
        alpha=float(d.get("alpha", 0.5)),
        max_step=float(d.get("max_step", 1.0)),
    )
    return DRO(
        mode=str(d["mode"]),
        settings=settings,
        prior=str(d.get("prior", "uniform")),
        source_sizes=common.get("source_sizes"),
        sample_by_lambda=d.get("sample_by_lambda"),
        loss=str(d.get("loss", "plain")),
        estimate=d.get("estimate"),
        smoothing=float(d.get("smoothing") or 0.0),
        **_fedavg_kwargs(cfg, common),
    )


@register_strategy("qfedavg")
def _qfedavg(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    q = cfg["qfedavg"]
    lipschitz = q.get("lipschitz")
    return QFedAvg(
        q=float(q["q"]),
        client_lr=float(q["client_lr"]),
        lipschitz=None if lipschitz is None else float(lipschitz),
        weighted_by_examples=bool(q.get("weighted_by_examples", True)),
        **_fedavg_kwargs(cfg, common),
    )


@register_strategy("feddg_ga")
def _feddg_ga(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    g = cfg["feddg_ga"]
    return FedDGGA(
        step=float(g["step"]),
        num_rounds=int(g.get("num_rounds") or 0),
        **_fedavg_kwargs(cfg, common),
    )


@register_strategy("fedbn")
def _fedbn(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    """FedBN (Li et al., 2021): FedAvg whose sites keep all their normalisation layers local."""
    return SourceFedAvg(**{**_fedavg_kwargs(cfg, common), "local_norm": "all"})


@register_strategy("local")
def _local(cfg: Mapping[str, Any], **common: Any) -> SourceFedAvg:
    return LocalOnly(**_fedavg_kwargs(cfg, common))


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
    "build_strategy",
    "list_strategies",
    "register_strategy",
]
