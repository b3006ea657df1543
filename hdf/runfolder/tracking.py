"""wandb logging of the same per-round series as metrics.jsonl (offline unless configured)."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hdf.runfolder.folder import RunFolder


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"train": {"a": {"uar": 1}}} -> {"train/a/uar": 1}; lists and non-numbers are dropped."""
    out: dict[str, float] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, int | float):  # bools too
            out[key] = float(v)
    return out


class Tracker:
    """A wandb run in the run folder; `output.wandb=disabled` (or WANDB_MODE) turns it off."""

    def __init__(self, cfg: DictConfig, run: RunFolder) -> None:
        mode = os.environ.get("WANDB_MODE", str(cfg.output.wandb))
        self.run = None
        if mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=str(cfg.output.wandb_project),
            name=run.path.name,
            dir=str(run.path),
            mode=mode,
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(flatten(row), step=int(row["round"]))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
