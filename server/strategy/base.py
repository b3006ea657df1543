"""FedAvg that knows which source each node serves (the harness every strategy shares).

Flower identifies nodes by id, and ids change when a site reconnects; sources are stable. This
class keeps the node -> source map (learned by a query message), trains only nodes of training
sources, validates replies, and keeps every source's numbers instead of only a weighted mean.
Subclasses override `aggregate_updates` (how valid updates become the new model) and, if they
must send something per round, `train_config`. Whatever they mix, the optional server optimiser
(`server_opt`, server/strategy/server_opt.py) then steps from the global model along the mix.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from hdf import contract as K
from hdf.seeding import round_seed
from server.arrays import BLOCK, array_view
from server.strategy.server_opt import ServerOptimizer
from server.validation import validate_train_replies

log = logging.getLogger(__name__)
LOCAL_NORM_MODES = ("none", "stats", "all")


class SourceFedAvg(FedAvg):
    """FedAvg over sources: the baseline, and the base of the DRO family.

    Parameters
    ----------
    train_sources : list[int]
        Indices of the training sources, in run order.
    source_names : dict[int, str]
        Name of every source index (training and held out), for logs.
    seed : int (default: 0)
        Seeds node sampling, derived per round so a resumed run samples as the original did.
    min_train_replies : int (default: 1)
        Fewer valid updates than this and the round keeps the previous model.
    proximal_mu : float (default: 0.0)
        Sent to clients; positive values make them add the FedProx term.
    local_norm : str (default: "none")
        Normalisation state every training site keeps local and uses when it trains and scores:
        "all" (FedBN, Li et al. 2021: parameters and running statistics), "stats" (SiloBN,
        Andreux et al. 2020: running statistics only, affine parameters shared) or "none". The
        server still mixes every array, so held-out sources are scored with the mixed state.
    server_opt : ServerOptimizer | None (default: None)
        Steps from the global model along `mix - global` (FedAvgM, FedAdam, FedYogi, a server
        lr); None takes the mix as the new model.

    The remaining keyword arguments are FedAvg's.
    """

    def __init__(
        self,
        *,
        train_sources: list[int],
        source_names: dict[int, str],
        seed: int = 0,
        min_train_replies: int = 1,
        proximal_mu: float = 0.0,
        local_norm: str = "none",
        server_opt: ServerOptimizer | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        if local_norm not in LOCAL_NORM_MODES:
            raise ValueError(
                f"strategy.local_norm={local_norm!r}; choose one of {', '.join(LOCAL_NORM_MODES)}"
            )
        fedavg_kwargs.setdefault("min_train_nodes", 1)
        fedavg_kwargs.setdefault("min_evaluate_nodes", 1)
        fedavg_kwargs.setdefault("min_available_nodes", 1)
        super().__init__(**fedavg_kwargs)
        self.train_sources = list(train_sources)
        self.source_names = dict(source_names)
        self.seed = seed
        self.min_train_replies = min_train_replies
        self.proximal_mu = proximal_mu
        self.local_norm = local_norm
        self.server_opt = server_opt
        self.node_source: dict[int, int] = {}  # node id -> source index
        self.heldout_nodes: set[int] = set()
        self.current_arrays: ArrayRecord | None = None
        self.train_by_source: dict[int, dict[str, float]] = {}
        self.eval_by_source: dict[int, dict[str, Any]] = {}
        self.rejected: list[dict[str, Any]] = []

    # ---- node bookkeeping -------------------------------------------------------------------
    def register_node(self, node_id: int, source_index: int, heldout: bool) -> None:
        """Record what a node serves (answer to the start-of-round query)."""
        self.node_source[node_id] = source_index
        if heldout:
            self.heldout_nodes.add(node_id)

    def training_nodes(self, grid: Grid) -> list[int]:
        online = set(grid.get_node_ids())
        return sorted(
            n
            for n, s in self.node_source.items()
            if n in online and n not in self.heldout_nodes and s in self.train_sources
        )

    def sample_training_nodes(self, server_round: int, nodes: list[int]) -> list[int]:
        """Uniform sample of `fraction_train` of the training nodes (seeded per round)."""
        k = max(int(len(nodes) * self.fraction_train), min(self.min_train_nodes, len(nodes)))
        rng = random.Random(round_seed(self.seed, server_round))
        return sorted(rng.sample(nodes, k))

    # ---- hooks subclasses extend ------------------------------------------------------------
    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The config sent with every train message (a copy: `start` reuses the original)."""
        out = ConfigRecord(dict(config))
        out[K.SERVER_ROUND] = server_round
        if self.proximal_mu > 0:
            out[K.PROXIMAL_MU] = float(self.proximal_mu)
        if self.local_norm != "none":
            out[K.LOCAL_NORM] = self.local_norm
        return out

    def aggregate_updates(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """FedAvg: the mean of the updates weighted by `num-examples`."""
        weights = [float(m.content[K.METRICS][K.NUM_EXAMPLES]) for m in replies]
        return weighted_average([m.content[K.ARRAYS] for m in replies], weights)

    # ---- Flower's strategy hooks ------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        if self.fraction_train == 0.0:
            return []
        nodes = self.sample_training_nodes(server_round, self.training_nodes(grid))
        cfg = self.train_config(server_round, config)
        return self.messages(nodes, arrays, cfg, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Replies arrive in whatever order the sites finish; float sums are not associative, so
        # the mix is taken in a fixed order (source, node) to make a round reproducible.
        replies = sorted(replies, key=_reply_order)
        valid, rejected = validate_train_replies(
            replies, self.current_arrays, set(self.train_sources), self.node_source
        )
        for r in rejected:
            r["round"] = server_round
            log.warning(
                "round %d: rejected update from node %s: %s", server_round, r["node"], r["reason"]
            )
        self.rejected.extend(rejected)
        self.train_by_source = {
            int(m.content[K.METRICS][K.SOURCE_INDEX]): {
                k: float(v) for k, v in m.content[K.METRICS].items()
            }
            for m in valid
        }
        if len(valid) < max(1, self.min_train_replies):
            log.warning(
                "round %d: %d valid updates (< %d needed): keeping the previous model",
                server_round,
                len(valid),
                max(1, self.min_train_replies),
            )
            return None, None
        arrays = self.aggregate_updates(server_round, valid)
        if arrays is not None and self.server_opt is not None and self.current_arrays is not None:
            arrays = self.server_opt.step(self.current_arrays, arrays)
        return arrays, self.train_summary()

    def train_summary(self) -> MetricRecord:
        rows = list(self.train_by_source.values())
        return MetricRecord(
            {
                "train-loss-mean": float(np.mean([r[K.TRAIN_LOSS] for r in rows])),
                "loss-before-mean": float(np.mean([r[K.LOSS_BEFORE] for r in rows])),
                "loss-before-max": float(np.max([r[K.LOSS_BEFORE] for r in rows])),
            }
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every online node evaluates: training sources on val, held-out nodes on test."""
        if self.fraction_evaluate == 0.0:
            return []
        cfg = self.evaluate_config(server_round, config)
        return self.messages(self.evaluation_nodes(grid), arrays, cfg, MessageType.EVALUATE)

    def arrays_for(self, node: int, arrays: ArrayRecord) -> ArrayRecord:
        """The model sent to `node`: the global one (local-only training sends each its own)."""
        return arrays

    def messages(
        self, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord, kind: str
    ) -> list[Message]:
        """One message per node carrying `arrays_for(node)` and `config`."""
        return [
            Message(
                content=RecordDict({K.ARRAYS: self.arrays_for(n, arrays), K.CONFIG: config}),
                message_type=kind,
                dst_node_id=n,
            )
            for n in nodes
        ]

    def evaluation_nodes(self, grid: Grid) -> list[int]:
        """Every online node whose source is known (training and held-out sites)."""
        online = set(grid.get_node_ids())
        return sorted(n for n in self.node_source if n in online)

    def evaluate_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The config sent with every evaluate message (a copy, as for training)."""
        out = ConfigRecord(dict(config))
        out[K.SERVER_ROUND] = server_round
        if self.local_norm != "none":
            out[K.LOCAL_NORM] = self.local_norm  # sites score with their own norm state
        return out

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        self.eval_by_source = {}
        for m in replies:
            if m.has_error():
                log.warning(
                    "round %d: evaluation failed on node %s: %s",
                    server_round,
                    m.metadata.src_node_id,
                    m.error.reason,
                )
                continue
            mr = m.content[K.METRICS]
            self.eval_by_source[int(mr[K.SOURCE_INDEX])] = {k: float(v) for k, v in mr.items()}
        train_rows = [v for s, v in self.eval_by_source.items() if s in self.train_sources]
        if not train_rows:
            return None
        return MetricRecord(
            {
                "val-uar-mean": float(np.mean([r[K.UAR] for r in train_rows])),
                "val-uar-worst": float(np.min([r[K.UAR] for r in train_rows])),
            }
        )

    # ---- checkpointed state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (FedAvg keeps nothing between rounds)."""

    def weights_by_source(self) -> dict[int, float]:
        """The current mixing weight of each training source (what `lambda` logs)."""
        sizes = {
            s: self.train_by_source.get(s, {}).get(K.NUM_EXAMPLES, 0.0) for s in self.train_sources
        }
        total = sum(sizes.values())
        if total <= 0:
            return {s: 1.0 / len(self.train_sources) for s in self.train_sources}
        return {s: v / total for s, v in sizes.items()}


def _reply_order(msg: Message) -> tuple[int, int]:
    """(source index, node id); replies without a readable source index sort first."""
    src = -1
    if not msg.has_error():
        metrics = msg.content.get(K.METRICS)
        if metrics is not None and K.SOURCE_INDEX in metrics:
            src = int(metrics[K.SOURCE_INDEX])
    return src, int(msg.metadata.src_node_id)


def weighted_average(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """sum_i w_i * arrays_i / sum_i w_i, key by key.

    Each array is read in place from its record's bytes (`Array.numpy()` copies them through
    `np.load`), and the sum runs block by block with the replies inside: a block of the running
    sum stays in cache while every reply's block is added to it, so a round reads each update
    once and writes the result once (key by key, the sum was re-read and re-written per reply).
    """
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}; need a positive total")
    factors = [w / total for w in weights]
    out: dict[str, Array] = {}
    for key in records[0]:
        ref = array_view(records[0][key])
        views = [ref.reshape(-1), *(array_view(rec[key]).reshape(-1) for rec in records[1:])]
        # floats accumulate in their own precision (as Flower's FedAvg does); integers in float64
        work = ref.dtype if ref.dtype.kind == "f" else np.float64
        acc = np.zeros(ref.size, dtype=work)
        term = np.empty(min(ref.size, BLOCK), dtype=work)
        for lo in range(0, ref.size, BLOCK):
            part = acc[lo : lo + BLOCK]
            scaled = term[: part.size]
            for v, f in zip(views, factors, strict=True):
                np.multiply(v[lo : lo + BLOCK], f, out=scaled, casting="unsafe")
                part += scaled
        if np.issubdtype(ref.dtype, np.integer):
            acc = np.rint(acc)
        out[key] = Array(np.asarray(acc.reshape(ref.shape), dtype=ref.dtype))
    return ArrayRecord(out)
