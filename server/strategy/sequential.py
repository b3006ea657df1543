"""Sequential federated learning: the model visits the training sites one after another.

FedAvg trains every site from the same global model and averages what comes back; the sites'
trajectories part between averages, and the average of models fit to different sources
generalises less to a new source than a model that took the same steps in sequence (README,
Results: the pooled model batched by source, which is such a sequence with one-batch visits).
Here each round sends the model to one training site at a time, in a fresh random order per
round; each site trains the model the previous site returned (cyclic weight transfer, Chang et
al., JAMIA 2018; sequential FL, Li and Lyu, NeurIPS 2023). The round's client epochs are
FedAvg's; a round takes as many exchanges as there are sites, and sites wait for each other.

Each reply is checked as FedAvg checks it, against the model that site was sent; a refused one
is skipped and the next site trains the model it would have been sent. The round's model is
the last accepted reply's weights with the BatchNorm running statistics (the model's buffers)
averaged over the accepted replies, weighted by clips as FedAvg would, so a held-out site is
scored with every source's statistics, not mostly the last site's. The server optimiser, if
any, steps once per round from the round's start model to that result.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid

from hdf.seeding import round_seed
from server.strategy.base import SourceFedAvg, weighted_average
from server.strategy.rounds import TrainRound

Exchange = Callable[[list[Message]], list[Message]]


class SourceSequential(SourceFedAvg):
    """Sites train one after another on the model the previous one returned.

    ``buffers``: the model's buffer keys (BatchNorm running statistics and counters), which are
    averaged over the round's accepted replies instead of taken from the last one.
    """

    def __init__(self, *, buffers: Collection[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buffers = frozenset(buffers)

    def visit_order(self, server_round: int, nodes: list[int]) -> list[int]:
        """`nodes` in a random order drawn from (seed, round), so a resumed run repeats it."""
        order = list(nodes)
        random.Random(round_seed(self.seed, server_round, 1)).shuffle(order)
        return order

    def train_in_sequence(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        exchange: Exchange,
    ) -> tuple[TrainRound, int, int]:
        """(the round's result, messages sent, train replies received): one exchange per site."""
        self._refusals()  # nothing logged before this round belongs to it
        nodes = [] if self.fraction_train == 0.0 else self.training_nodes(grid)
        nodes = self.visit_order(server_round, self.sample_training_nodes(server_round, nodes))
        cfg = self.train_config(server_round, config)
        model, accepted, replied = arrays, [], 0
        by_source: dict[int, dict[str, float]] = {}
        update_norm: dict[int, float] = {}
        sizes: dict[int, float] = {}
        for node in nodes:
            self.current_arrays = model  # each reply is checked against what its site was sent
            msgs = self.messages([node], model, cfg, MessageType.TRAIN)
            replies = [m for m in exchange(msgs) if m.metadata.message_type == MessageType.TRAIN]
            replied += len(replies)
            valid, metrics, norms = self.accepted_updates(server_round, replies)
            by_source.update(metrics)
            update_norm.update(norms)
            for src, size in self.round_sizes.items():
                sizes[src] = sizes.get(src, 0.0) + size
            if len(valid):  # several nodes of one source: their clip-weighted mean
                model = self.aggregate_updates(server_round, valid)
                accepted.append((sum(self.size_of(m) for m in valid.messages), model))
        self.current_arrays = arrays
        self.round_sizes = sizes
        mixed = None
        if self.enough_updates(server_round, len(accepted)):
            end = self.with_mean_buffers(model, accepted)
            mixed = self.server_step(server_round, arrays, end, [a for _, a in accepted])
        rejected, flagged = self._refusals()
        summary = self.train_summary(by_source) if mixed is not None else None
        result = TrainRound(mixed, by_source, update_norm, rejected, flagged, summary)
        return result, len(nodes), replied

    def with_mean_buffers(
        self, model: ArrayRecord, accepted: list[tuple[float, ArrayRecord]]
    ) -> ArrayRecord:
        """`model` with every buffer replaced by the clip-weighted mean over `accepted`."""
        keys = [k for k in model if k in self.buffers]
        if not keys or len(accepted) < 2:
            return model
        parts = [ArrayRecord({k: rec[k] for k in keys}) for _, rec in accepted]
        mean = weighted_average(parts, [w for w, _ in accepted])
        return ArrayRecord({k: mean[k] if k in mean else model[k] for k in model})
