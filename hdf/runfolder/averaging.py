"""The average of a run's late models (stochastic weight averaging, Izmailov et al., UAI 2018).

Averaging the global model over the rounds after `server.average_after` of a run finds a flatter,
more central point of the late trajectory than its last model; with SAM at the sites that is the
combination Caldarola et al. (ECCV 2022) report closing part of federated learning's gap under
heterogeneous clients, and averaging is what SWAD (Cha et al., NeurIPS 2021) uses for unseen
domains. The average does not feed back into training: the rounds are the same with or without
it, and the run scores the average once at its end, so "average against last round" is a
comparison within the same runs.

A run keeps `average.pt` (the averaged model, in checkpoint form: `hdf.checkpoint` reads it) and
`average.json` (its evaluation row, as metrics.jsonl rows are, plus which rounds it averages).
BatchNorm running statistics are averaged like the weights; integer buffers (batch counters)
take the last model's value. The federated and the pooled runs average alike, so their ratio
compares like with like.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hdf.runfolder.folder import clean

AVERAGE_MODEL_FILE = "average.pt"
AVERAGE_INFO_FILE = "average.json"


def averaged_in_round(after: float | None, server_round: int, rounds: int) -> bool:
    """Whether round `server_round` of `rounds` enters the average: the rounds after
    `after` (a fraction of the run); never when that is null."""
    return after is not None and server_round > float(after) * int(rounds)


class ModelAverage:
    """Running mean of state dicts: mean += (model - mean) / n for floating tensors."""

    def __init__(self) -> None:
        self.count = 0
        self.first_round: int | None = None
        self.last_round: int | None = None
        self.mean: dict[str, torch.Tensor] = {}

    def update(self, state: Mapping[str, torch.Tensor], server_round: int) -> None:
        """Add the model of `server_round` (copied: the caller's tensors are never changed)."""
        if self.mean and set(state) != set(self.mean):
            raise ValueError(
                f"round {server_round}'s model has other tensors than the average's "
                f"({sorted(set(state) ^ set(self.mean))[:5]}): the model changed mid-run"
            )
        self.count += 1
        if self.first_round is None:
            self.first_round = server_round
        self.last_round = server_round
        for name, x in state.items():
            x = x.detach().cpu()
            if name not in self.mean or not x.is_floating_point():
                self.mean[name] = x.clone()
            else:
                self.mean[name] += (x.to(self.mean[name].dtype) - self.mean[name]) / self.count

    def state(self) -> dict[str, torch.Tensor]:
        """The averaged model (a copy)."""
        return {k: v.clone() for k, v in self.mean.items()}

    def info(self) -> dict[str, Any]:
        return {
            "first_round": self.first_round,
            "last_round": self.last_round,
            "models": self.count,
        }

    def state_dict(self) -> dict[str, Any]:
        """For the run's checkpoint, so a resumed run averages exactly what it would have."""
        return {**self.info(), "mean": self.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["models"])
        self.first_round, self.last_round = state["first_round"], state["last_round"]
        self.mean = {k: v.clone() for k, v in state["mean"].items()}


def write_average(
    folder: str | os.PathLike[str],
    average: ModelAverage,
    row: Mapping[str, Any],
    config_yaml: str,
) -> dict[str, Any]:
    """Write average.pt and average.json (the evaluation `row` with the averaged rounds);
    returns what average.json holds."""
    folder = Path(folder)
    info = {**dict(row), "average": average.info()}
    tmp = folder / (AVERAGE_MODEL_FILE + ".tmp")
    torch.save(
        {
            "round": average.last_round,
            "model": average.state(),
            "config": config_yaml,
            "average": average.info(),
        },
        tmp,
    )
    os.replace(tmp, folder / AVERAGE_MODEL_FILE)
    tmp = folder / (AVERAGE_INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(clean(info), allow_nan=False) + "\n")
    os.replace(tmp, folder / AVERAGE_INFO_FILE)
    return info


def read_average(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A run's average.json, or None when the run has no average."""
    f = Path(folder) / AVERAGE_INFO_FILE
    return json.loads(f.read_text()) if f.is_file() else None
