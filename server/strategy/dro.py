"""Distributionally robust aggregation over sources (Group DRO / AFL / DRFA lineage).

Each round the server raises the weight lambda_k of the sources whose loss under the current global
model (`loss-before`, measured by every client before it trains) is high, and mixes the updates
with those weights, so the worst-served source improves (DESIGN.md section 4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from hdf import contract as K
from server.strategy.base import SourceFedAvg, weighted_average
from server.strategy.dro_math import DROSettings, update_lambda


class DRO(SourceFedAvg):
    """Source-weighted FedAvg whose weights solve the max over source mixtures.

    Every client **must** report `loss-before` (mean loss of the received model on a fixed
    sample of its training data, measured before local training) and `source-index`.

    Parameters
    ----------
    mode : str (default: "eg")
        The lambda update, a key of `server.strategy.dro_math.DRO_MODES`.
    settings : DROSettings
        eta, eps (prior mixing), cap, loss clipping and mode-specific values.
    prior : str (default: "uniform")
        "uniform", or "size" for proportional to each source's training clips.
    source_sizes : dict[int, int] | None
        Training clips per source (needed for the "size" prior).
    server_lr : float (default: 1.0)
        The new model is old + server_lr * (mix - old).

    The remaining keyword arguments are `SourceFedAvg`'s.
    """

    def __init__(
        self,
        *,
        mode: str = "eg",
        settings: DROSettings | None = None,
        prior: str = "uniform",
        source_sizes: dict[int, int] | None = None,
        server_lr: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        self.settings = settings or DROSettings()
        self.server_lr = server_lr
        self.prior = make_prior(prior, self.train_sources, source_sizes)
        self.lam = self.prior.copy()

    def aggregate_updates(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """Update lambda from the reported losses, then mix the updates by lambda."""
        idx = {s: i for i, s in enumerate(self.train_sources)}
        losses = np.zeros(len(self.train_sources))
        mask = np.zeros(len(self.train_sources), dtype=bool)
        per_source: dict[int, list[Message]] = {}
        for m in replies:
            src = int(m.content[K.METRICS][K.SOURCE_INDEX])
            per_source.setdefault(src, []).append(m)
        for src, msgs in per_source.items():
            n = np.array([float(m.content[K.METRICS][K.NUM_EXAMPLES]) for m in msgs])
            lb = np.array([float(m.content[K.METRICS][K.LOSS_BEFORE]) for m in msgs])
            losses[idx[src]] = float((n * lb).sum() / n.sum())
            mask[idx[src]] = True
        self.lam = update_lambda(self.mode, self.lam, losses, mask, self.prior, self.settings)
        # Mix the participants by lambda (renormalised over those that replied); several
        # nodes of one source share its weight by their number of clips.
        records, weights = [], []
        for src, msgs in per_source.items():
            n = np.array([float(m.content[K.METRICS][K.NUM_EXAMPLES]) for m in msgs])
            for m, share in zip(msgs, n / n.sum(), strict=True):
                records.append(m.content[K.ARRAYS])
                weights.append(self.lam[idx[src]] * share)
        mixed = weighted_average(records, weights)
        if self.server_lr == 1.0 or self.current_arrays is None:
            return mixed
        return interpolate(self.current_arrays, mixed, self.server_lr)

    def train_summary(self) -> MetricRecord:
        out = super().train_summary()
        out["lambda-max"] = float(self.lam.max())
        return out

    def weights_by_source(self) -> dict[int, float]:
        return {s: float(w) for s, w in zip(self.train_sources, self.lam, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": {int(s): float(w) for s, w in zip(self.train_sources, self.lam, strict=True)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lam = state["lambda"]
        self.lam = np.array([float(lam[s]) for s in self.train_sources])


def make_prior(kind: str, sources: list[int], sizes: dict[int, int] | None) -> np.ndarray:
    """The prior p over training sources: uniform, or proportional to data size."""
    if kind == "uniform":
        return np.full(len(sources), 1.0 / len(sources))
    if kind == "size":
        if not sizes:
            raise ValueError("prior='size' needs the training size of every source")
        p = np.array([float(sizes[s]) for s in sources])
        return p / p.sum()
    raise ValueError(f"unknown prior {kind!r}; use 'uniform' or 'size'")


def interpolate(old: ArrayRecord, new: ArrayRecord, lr: float) -> ArrayRecord:
    """old + lr * (new - old) for floating arrays (a server learning rate); others take new."""
    out = {}
    for key in new:
        o, n = old[key].numpy(), new[key].numpy()
        if np.issubdtype(n.dtype, np.floating):
            n = (o + lr * (n.astype(np.float64) - o)).astype(n.dtype)
        out[key] = Array(np.asarray(n))
    return ArrayRecord(out)
