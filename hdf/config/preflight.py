"""Checks that a run can train, made before its run folder is created or any model is built.

A run that cannot train must fail at once with one line naming the key or file, not run empty
rounds and end as a success. `check_config` needs no data: counts must be whole numbers >= 1 and
the learning rate a positive number. `check_data` opens every split the run will read (train and
val of each training source, test of each held-out one); for file-list datasets that only reads
the lists, so an empty split or a manifest whose clips are all missing is caught here. Generated
splits (the synthetic benchmark) are never empty and are not generated twice.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hdf.data import SPLITS, build_sources, split_sources

log = logging.getLogger(__name__)

# Whole numbers >= 1: key -> what it counts (the error says it).
POSITIVE_INTS = {
    "rounds": "federated rounds",
    "train.batch_size": "clips per training batch",
    "eval.batch_size": "clips per evaluation batch",
    "data.num_frames": "frames per clip (T)",
    "data.size": "side of the square frames the model sees",
}
POSITIVE_FLOATS = {
    "train.lr": "peak learning rate",
    "train.local_epochs": "passes over a client's training split per round; 0.5 is half a pass",
}


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def check_config(cfg: DictConfig) -> None:
    """Raise ValueError naming the first key whose value no run can train with."""
    for key, what in POSITIVE_INTS.items():
        v = _value(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"{key}={v!r}: must be a whole number >= 1 ({what}); "
                f"give e.g. {key}={OmegaConf.select(_defaults(), key)}"
            )
    for key, what in POSITIVE_FLOATS.items():
        v = _value(cfg, key)
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        if not ok:
            raise ValueError(f"{key}={v!r}: must be a positive number ({what})")
    step = OmegaConf.select(cfg, "server_opt", default=None)
    kept = bool(OmegaConf.select(cfg, "train.keep_optimizer_state", default=False))
    if kept and step is not None and step.name in ("none", "avgm") and float(step.lr) > 1:
        log.warning(
            "train.keep_optimizer_state=true with server_opt.lr=%s: kept AdamW moments plus a "
            "server step above 1 collapsed to chance in every run measured (README, Results); "
            "give server_opt.lr=1.0 with it",
            step.lr,
        )
    after = OmegaConf.select(cfg, "train.fixed_norm_after", default=None)
    if after is not None:
        ok = isinstance(after, int | float) and not isinstance(after, bool) and 0 <= after <= 1
        if not ok:
            raise ValueError(
                f"train.fixed_norm_after={after!r}: must be a fraction of the rounds in [0, 1] "
                "(0.5: the second half trains with fixed BatchNorm statistics) or null"
            )
        local = OmegaConf.select(cfg, "strategy.local_norm", default="none")
        if local in ("stats", "all") or OmegaConf.select(cfg, "strategy.name") == "fedbn":
            raise ValueError(
                "train.fixed_norm_after (FixBN) trains every site with the mixed BatchNorm "
                f"statistics, while strategy.local_norm={local} keeps each site's own: choose "
                "one, e.g. strategy.local_norm=recompute with FixBN"
            )
    average = OmegaConf.select(cfg, "server.average_after", default=None)
    if average is not None:
        ok = isinstance(average, int | float) and not isinstance(average, bool)
        if not (ok and 0 <= average < 1):
            raise ValueError(
                f"server.average_after={average!r}: must be a fraction of the rounds in [0, 1) "
                "(0.5: the models of the second half are averaged) or null for no average"
            )
    adapt, norm = list(cfg.server.heldout_adapt), cfg.model.norm
    if "bn" in adapt and norm != "batch":
        raise ValueError(
            f"server.heldout_adapt={adapt} asks for AdaBN, but model.norm={norm} has no BatchNorm "
            "statistics to recompute: drop bn, e.g. server.heldout_adapt=[none] (or [none,tent])"
        )


def _defaults() -> DictConfig:
    """The default config, for the example value in an error."""
    from hdf.config import compose

    return compose([])


def check_data(cfg: DictConfig, *, every_split: bool = False) -> None:
    """Open every split the run reads (all splits of all sources when `every_split`, LOSO)."""
    sources = build_sources(cfg.data)
    if every_split:  # the sweep sets data.heldout per run; the base config's does not apply
        needs = [(s, split) for s in sources for split in SPLITS]
    else:
        train, heldout = split_sources(sources, list(cfg.data.heldout), cfg.data.train)
        needs = [(s, split) for s in train for split in ("train", "val")]
        needs += [(s, "test") for s in heldout]
    if not sources or not sources[0].dataset.cheap_splits:
        return
    for source, split in needs:
        source.split(split)  # raises ValueError naming the source, the split and the fix


def check_run(cfg: DictConfig) -> None:
    """Everything checkable before a run folder exists: the config, then the data."""
    check_config(cfg)
    check_data(cfg)
