"""Federated Domain Generalization with Generalization Adjustment [Zhang et al., CVPR 2023].

Paper: https://openaccess.thecvf.com/content/CVPR2023/papers/Zhang_Federated_Domain_Generalization_With_Generalization_Adjustment_CVPR_2023_paper.pdf
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from hdf import contract as K
from server.strategy.base import SourceFedAvg
from server.strategy.dro import mix_by_source
from server.strategy.feddg_ga_math import feddg_ga_step, linear_decay
from server.strategy.rounds import SourceReplies


class FedDGGA(SourceFedAvg):
    """FedAvg whose per-source weights follow each source's generalization gap.

    Implementation based on the paper's update as FL4Health writes it (mean-centred gap,
    step d * (1 - r / R), clip to [0, 1], renormalise), on losses (signal +1).

    Gap of source k after round r: G_k = L_k(global model after aggregation) - L_k(k's own local
    model before aggregation). "After" is the source's validation loss from the round's
    federated evaluation (`evaluated`). "Before" is the local model's loss on the same
    split: every train message asks for it (`local-val`) and the client reports
    `local-val-loss`. A client that does not stands in its `train-loss`, which is a different
    loss (HDF's weighted CE + contrastive terms, on augmented clips, under SAM), so its gap is
    biased; that fallback only keeps older clients working. The new weights apply from the next
    round; sources without both numbers this round keep their weight.

    Parameters
    ----------
    step : float (default: 0.2)
        The step size d (the paper's default).
    num_rounds : int (default: 0)
        R for the linear decay of d; 0 keeps d constant.

    The remaining keyword arguments are `SourceFedAvg`'s.
    """

    def __init__(self, *, step: float = 0.2, num_rounds: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = float(step)
        self.num_rounds = int(num_rounds)
        self.weights = np.full(len(self.train_sources), 1.0 / len(self.train_sources))
        self.local_loss: dict[int, float] = {}  # source -> loss of its local model this round
        self.gaps: dict[int, float] = {}

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """Ask every client for its local model's validation loss (the gap's "before")."""
        out = super().train_config(server_round, config)
        out[K.LOCAL_VAL] = 1
        return out

    def aggregate_updates(self, server_round: int, replies: SourceReplies) -> ArrayRecord | None:
        """Mix by the current weights; remember each local model's loss for the gap."""
        self.local_loss = {}
        for m in replies.messages:
            mr = m.content[K.METRICS]
            before = mr.get(K.LOCAL_VAL_LOSS, mr[K.TRAIN_LOSS])
            self.local_loss[int(mr[K.SOURCE_INDEX])] = float(before)
        weights = dict(zip(self.train_sources, self.weights, strict=True))
        return mix_by_source(replies, weights, self.size_of)

    def evaluated(self, server_round: int, by_source: dict[int, dict[str, float]]) -> None:
        """Adjust the weights by the gaps, from the aggregated model's scores per source."""
        if server_round < 1 or not self.local_loss:
            return
        gaps = np.zeros(len(self.train_sources))
        mask = np.zeros(len(self.train_sources), dtype=bool)
        self.gaps = {}
        for i, s in enumerate(self.train_sources):
            if s in self.local_loss and s in by_source:
                gaps[i] = float(by_source[s][K.LOSS]) - self.local_loss[s]
                mask[i] = True
                self.gaps[s] = gaps[i]
        d = linear_decay(self.step, server_round, self.num_rounds)
        self.weights = feddg_ga_step(self.weights, gaps, mask, d, signal=1.0)
        self.local_loss = {}

    def weights_by_source(self) -> dict[int, float]:
        return {s: float(w) for s, w in zip(self.train_sources, self.weights, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "weights": {
                int(s): float(w) for s, w in zip(self.train_sources, self.weights, strict=True)
            },
            "local_loss": dict(self.local_loss),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        w = state["weights"]
        self.weights = np.array([float(w[s]) for s in self.train_sources])
        self.local_loss = {int(k): float(v) for k, v in state.get("local_loss", {}).items()}
