"""Local-only training: every source trains its own model and nothing is averaged (baseline)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from hdf import contract as K
from server.strategy.base import SourceFedAvg, weighted_average
from server.strategy.rounds import SourceReplies

log = logging.getLogger(__name__)


class LocalOnly(SourceFedAvg):
    """Each source's model is trained on that source alone; the server only relays.

    The server keeps one ArrayRecord per training source (all start from the same initial
    model) and sends every node its own source's model, for training and for validation, so
    the in-distribution numbers are each site's own model on its own data.

    The global model (what held-out sources are scored on, and what the checkpoint calls
    "model") is the uniform average of the local models, a model soup: one site, one vote,
    whatever its size. Averaging independently trained models from a shared start is a weak
    model, which is the point of the baseline (what a site gets without federation); the
    per-site models themselves live in the strategy state.

    No shared model is trained, so a server optimiser has nothing to step: `server_opt` is
    ignored (with a warning).

    Takes `SourceFedAvg`'s parameters.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.server_opt is not None and not self.server_opt.identity:
            log.warning("strategy=local trains no shared model: server_opt is ignored")
        self.server_opt = None
        self.local: dict[int, ArrayRecord] = {}

    def arrays_for(self, node: int, arrays: ArrayRecord) -> ArrayRecord:
        """A training node gets its own source's model; held-out nodes get the soup."""
        src = self.node_source.get(node)
        if src is None or node in self.heldout_nodes:
            return arrays
        return self.local.get(src, arrays)

    def aggregate_updates(self, server_round: int, replies: SourceReplies) -> ArrayRecord | None:
        """Keep each source's update as its model; the global model is their uniform soup."""
        for src, msgs in replies.by_source.items():
            n = [self.size_of(m) for m in msgs]
            self.local[src] = (
                msgs[0].content[K.ARRAYS]
                if len(msgs) == 1
                else weighted_average([m.content[K.ARRAYS] for m in msgs], n)
            )
        models = list(self.local.values())
        return weighted_average(models, [1.0] * len(models))

    def weights_by_source(self) -> dict[int, float]:
        """The soup's weights: uniform over the sources that have a model."""
        have = [s for s in self.train_sources if s in self.local] or self.train_sources
        return {s: (1.0 / len(have) if s in have else 0.0) for s in self.train_sources}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "local": {
                int(s): {k: np.array(a.numpy(), copy=True) for k, a in rec.items()}
                for s, rec in self.local.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.local = {
            int(s): ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
            for s, arrays in state.get("local", {}).items()
        }
