"""Model selection without peeking: the round whose model serves the worst training source best.

A run keeps `best.pt` (the model of the selected round, in checkpoint form: `hdf.checkpoint`
reads it) and `best.json` (the round and the criterion). The choice reads only the training
sources' validation numbers of each metrics.jsonl row (`row["train"]`); held-out sources never
take part, so their scores at the selected round are an honest estimate.

Criterion: the highest worst-source validation UAR over the training sources; ties (common
near chance, where every source scores 1/7) go to the higher mean, then to the later round.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

BEST_MODEL_FILE = "best.pt"
BEST_INFO_FILE = "best.json"
CRITERION = (
    "worst training-source validation UAR (ties: higher mean training-source validation UAR, "
    "then the later round); held-out sources are never read"
)


@dataclass(frozen=True)
class Selection:
    round: int
    worst_train_uar: float
    mean_train_uar: float

    @property
    def key(self) -> tuple[float, float, int]:
        return self.worst_train_uar, self.mean_train_uar, self.round


def score_row(row: Mapping[str, Any]) -> Selection | None:
    """The criterion of one metrics row, from `row["round"]` and `row["train"]` only."""
    uars = [v.get("uar") for v in (row.get("train") or {}).values()]
    # sorted: the sources come in reply order, and a float sum depends on its order
    uars = sorted(float(u) for u in uars if u is not None and np.isfinite(u))
    if not uars:
        return None
    return Selection(int(row["round"]), min(uars), float(np.mean(uars)))


def select_round(rows: Iterable[Mapping[str, Any]]) -> Selection | None:
    """The selected round of a run's metrics rows (None when no row has training numbers)."""
    scored = [s for s in map(score_row, rows) if s is not None]
    return max(scored, key=lambda s: s.key) if scored else None


class BestModel:
    """Writes best.pt and best.json into a run folder whenever a round beats the best so far."""

    def __init__(self, folder: str | os.PathLike[str], config_yaml: str) -> None:
        self.folder = Path(folder)
        self.config_yaml = config_yaml
        self.best: Selection | None = None

    def offer(self, row: Mapping[str, Any], model: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Keep `model()` (called only if needed) if `row` is the best round so far."""
        s = score_row(row)
        if s is None or (self.best is not None and s.key <= self.best.key):
            return False
        self._write(s, model())
        return True

    def resume(
        self, rows: list[Mapping[str, Any]], last_round: int, model: dict[str, torch.Tensor]
    ) -> None:
        """Continue after a resume from `last_round`'s checkpoint (holding `model`).

        The rows up to the checkpoint give the best so far. best.pt is written after the
        checkpoint, so a run that died in between may lack the checkpoint round's best.pt:
        it is rewritten from the checkpoint's model.
        """
        self.best = select_round(rows)
        if self.best is None or self.best.round != last_round:
            return
        info = self.folder / BEST_INFO_FILE
        saved = json.loads(info.read_text()).get("round") if info.exists() else None
        if saved != last_round or not (self.folder / BEST_MODEL_FILE).exists():
            self._write(self.best, model)

    def _write(self, s: Selection, model: dict[str, torch.Tensor]) -> None:
        info = {**asdict(s), "criterion": CRITERION}
        tmp = self.folder / (BEST_MODEL_FILE + ".tmp")
        torch.save(
            {"round": s.round, "model": model, "config": self.config_yaml, "best": info}, tmp
        )
        os.replace(tmp, self.folder / BEST_MODEL_FILE)
        tmp = self.folder / (BEST_INFO_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, self.folder / BEST_INFO_FILE)
        self.best = s
