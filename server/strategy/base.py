"""FedAvg that knows which source each node serves (the harness every strategy shares).

Flower identifies nodes by id, and ids change when a site reconnects; sources are stable. This
class keeps the node -> source map and each node's registered size (learned by a query message),
trains only nodes of training sources, validates every train and evaluate reply, and keeps every
source's numbers instead of only a weighted mean. Weights come from the sizes registered at
discovery (`size_of`), losses through the server's check against its own validation loss
(`loss_of`); a round whose mix holds NaN or Inf keeps the previous model.

The round loop calls `train_round` and `evaluate_round`, which return what it needs
(`server.strategy.rounds`: per-source numbers, refusals and flags with their reasons, the
weights); Flower's `aggregate_train` / `aggregate_evaluate` return the same aggregation in
Flower's types. Subclasses override `aggregate_updates` (how the valid updates, grouped by
source once, become the new model), `evaluated` (what an evaluation moves) and, if they must send
something per round, `train_config`. Whatever they mix, the optional server optimiser
(`server_opt`, server/strategy/server_opt.py) then steps from the global model along the mix.
"""

from __future__ import annotations

import logging
import math
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
from server.arrays import BLOCK, WireFormat, array_view, pack_record
from server.strategy.rounds import EvaluateRound, Flag, Rejection, SourceReplies, TrainRound
from server.strategy.server_opt import ServerOptimizer
from server.validation import (
    NORM_HISTORY,
    TRAIN_OPTIONAL,
    TRAIN_REQUIRED,
    bounded_loss,
    evaluate_metrics,
    evaluate_reply_problem,
    known_metrics,
    size_flag,
    unpack_reply,
    update_norms,
    validate_train_replies,
)

log = logging.getLogger(__name__)


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
    fraction_train : float (default: 1.0)
        Share of the online training nodes sampled each round (0: no training).
    fraction_evaluate : float (default: 1.0)
        0 turns evaluation off; any other value evaluates every online node.
    min_train_nodes : int (default: 1)
        The sample holds at least this many nodes (all of them when fewer are online).
    min_train_replies : int (default: 1)
        Fewer valid updates than this and the round keeps the previous model.
    proximal_mu : float (default: 0.0)
        Sent to clients; positive values make them add the FedProx term.
    local_norm : str (default: "none")
        Normalisation state every training site keeps local and uses when it trains and scores:
        "all" (FedBN, Li et al. 2021: parameters and running statistics), "stats" (SiloBN,
        Andreux et al. 2020: running statistics only, affine parameters shared), "recompute"
        (like "stats", but the statistics are re-estimated for the received weights on the
        site's own training clips before it scores them, instead of kept from its last local
        model) or "none". The server still mixes every array, so held-out sources are scored
        with the mixed state.
    server_opt : ServerOptimizer | None (default: None)
        Steps from the global model along `mix - global` (FedAvgM, FedAdam, FedYogi, a server
        lr); None takes the mix as the new model.
    loss_tolerance : float (default: 2.0)
        A `loss-before` above this multiple of the server-seen validation loss of the same
        model is flagged and replaced by it (`server.validation.bounded_loss`).
    wire : WireFormat | None (default: None, packed float32)
        How models travel: packed into one array plus a layout (`hdf.packing`), optionally
        in 16 bits; replies come back in the format they were sent in and are unpacked
        before any check.

    Any other keyword argument is a TypeError naming it: FedAvg's own options (weighted_by_key,
    the aggregation functions, ...) have no effect here, so they are not accepted.
    """

    def __init__(
        self,
        *,
        train_sources: list[int],
        source_names: dict[int, str],
        seed: int = 0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_train_replies: int = 1,
        proximal_mu: float = 0.0,
        local_norm: str = "none",
        server_opt: ServerOptimizer | None = None,
        loss_tolerance: float = 2.0,
        wire: WireFormat | None = None,
    ) -> None:
        if local_norm not in K.LOCAL_NORM_MODES:
            raise ValueError(
                f"strategy.local_norm={local_norm!r}; choose one of {', '.join(K.LOCAL_NORM_MODES)}"
            )
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=1,
            min_available_nodes=1,
        )
        self.train_sources = list(train_sources)
        self.source_names = dict(source_names)
        self.seed = seed
        self.min_train_replies = min_train_replies
        self.proximal_mu = proximal_mu
        self.local_norm = local_norm
        self.server_opt = server_opt
        if loss_tolerance < 1.0:
            raise ValueError(f"loss_tolerance must be >= 1, got {loss_tolerance}")
        self.loss_tolerance = float(loss_tolerance)
        self.wire = wire or WireFormat()
        self.loss_key = K.LOSS_BEFORE  # which reported loss `loss_of` reads (DRO may choose)
        self.node_source: dict[int, int] = {}  # node id -> source index
        self.node_size: dict[int, int] = {}  # node id -> clips registered at discovery
        self.heldout_nodes: set[int] = set()
        self.current_arrays: ArrayRecord | None = None
        self.round_sizes: dict[int, float] = {}  # source -> registered clips that trained
        # last server-seen validation losses per source (of the model clients train next)
        self.val_loss: dict[int, float] = {}
        self.val_fresh: set[int] = set()  # sources the last evaluation scored
        self.val_loss_balanced: dict[int, float] = {}
        self.norm_history: list[float] = []  # recently accepted update norms
        self._round_loss: dict[int, float] = {}  # node -> the loss `loss_of` gives this round
        # the refusals and flags of the aggregation running now (its result carries them)
        self._rejected: list[Rejection] = []
        self._flagged: list[Flag] = []

    # ---- node bookkeeping -------------------------------------------------------------------
    def register_node(self, node_id: int, source_index: int, heldout: bool, clips: int) -> None:
        """Record what a node serves and its size (its accepted answer to the query)."""
        self.node_source[node_id] = source_index
        self.node_size[node_id] = int(clips)
        if heldout:
            self.heldout_nodes.add(node_id)

    def forget_node(self, node_id: int) -> None:
        """Drop a node whose source another node took over (a site that reconnected)."""
        self.node_source.pop(node_id, None)
        self.node_size.pop(node_id, None)
        self.heldout_nodes.discard(node_id)

    def knows(self, node_id: int) -> bool:
        """Whether `node_id` has a registered source (its query reply was accepted)."""
        return node_id in self.node_source

    def reject(self, server_round: int, node: int | None, reason: str, kind: str) -> None:
        """Log a refused train or evaluate reply for this aggregation's result."""
        log.warning(
            "round %d: rejected %s reply from node %s: %s", server_round, kind, node, reason
        )
        src = self.node_source.get(node) if node is not None else None
        self._rejected.append(Rejection(server_round, kind, node, src, reason))

    def flag(self, server_round: int, node: int | None, reason: str) -> None:
        """Log a number the server replaced, or a result it refused, for this aggregation."""
        log.warning("round %d: flagged node %s: %s", server_round, node, reason)
        src = self.node_source.get(node) if node is not None else None
        self._flagged.append(Flag(server_round, node, src, reason))

    def _refusals(self) -> tuple[tuple[Rejection, ...], tuple[Flag, ...]]:
        """The refusals and flags logged since the last call (one aggregation's)."""
        out = tuple(self._rejected), tuple(self._flagged)
        self._rejected, self._flagged = [], []
        return out

    def size_of(self, msg: Message) -> float:
        """A reply's weight in clips: its node's size registered at discovery (issue 12 item 6)."""
        return float(self.node_size[msg.metadata.src_node_id])

    def loss_of(self, msg: Message) -> float:
        """A valid reply's loss-before as this round uses it (`bounded_loss`'s value)."""
        return self._round_loss[msg.metadata.src_node_id]

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

    def aggregate_updates(self, server_round: int, replies: SourceReplies) -> ArrayRecord | None:
        """FedAvg: the mean of the updates weighted by each node's registered clips."""
        weights = [self.size_of(m) for m in replies.messages]
        return weighted_average([m.content[K.ARRAYS] for m in replies.messages], weights)

    def evaluated(self, server_round: int, by_source: dict[int, dict[str, float]]) -> None:
        """What an evaluation of the global model moves (FedDG-GA: its weights); nothing here."""

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
        """Flower's hook: `train_round` as (new model or None, summary)."""
        result = self.train_round(server_round, replies)
        return result.arrays, result.summary

    def train_round(self, server_round: int, replies: Iterable[Message]) -> TrainRound:
        """Check the train replies, mix the valid ones and step the server optimiser."""
        self._refusals()  # nothing logged before this aggregation belongs to it
        valid, by_source, update_norm = self.accepted_updates(server_round, replies)
        arrays = self._mix(server_round, valid)
        rejected, flagged = self._refusals()
        summary = self.train_summary(by_source) if arrays is not None else None
        return TrainRound(arrays, by_source, update_norm, rejected, flagged, summary)

    def accepted_updates(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[SourceReplies, dict[int, dict[str, float]], dict[int, float]]:
        """(the valid replies, each source's checked train metrics, each source's update norm),
        every reply checked against `current_arrays`, the model it was sent; refusals and flags
        are logged for the running aggregation, `round_sizes` holds the sources that trained."""
        # Replies arrive in whatever order the sites finish; float sums are not associative, so
        # the mix is taken in a fixed order (source, node) to make a round reproducible.
        replies = sorted(replies, key=_reply_order)
        replies = self.unpack_replies(server_round, replies)
        check = validate_train_replies(
            replies,
            self.current_arrays,
            set(self.train_sources),
            self.node_source,
            self.norm_history,
        )
        for r in check.rejected:
            self.reject(server_round, r["node"], r["reason"], "train")
        valid = SourceReplies.of(check.valid)
        # plain floats: the checkpoint holds this list, and its loader allows no pickled objects
        self.norm_history = (self.norm_history + [float(n) for n in check.norms])[-NORM_HISTORY:]
        norm_of = {m.metadata.src_node_id: n for m, n in zip(check.valid, check.norms, strict=True)}
        by_source: dict[int, dict[str, float]] = {}
        update_norm: dict[int, float] = {}
        self.round_sizes = {}
        for src, msgs in valid.by_source.items():  # a source's last node speaks for it
            by_source[src] = known_metrics(
                msgs[-1].content[K.METRICS], TRAIN_REQUIRED, TRAIN_OPTIONAL
            )
            update_norm[src] = norm_of[msgs[-1].metadata.src_node_id]
            self.round_sizes[src] = sum(self.size_of(m) for m in msgs)
        self._check_reported_numbers(server_round, valid.messages)
        return valid, by_source, update_norm

    def _mix(self, server_round: int, valid: SourceReplies) -> ArrayRecord | None:
        """The new global model from the valid updates, or None to keep the previous one."""
        if not self.enough_updates(server_round, len(valid)):
            return None
        arrays = self.aggregate_updates(server_round, valid)
        updates = [m.content[K.ARRAYS] for m in valid.messages]
        return self.server_step(server_round, self.current_arrays, arrays, updates)

    def enough_updates(self, server_round: int, count: int) -> bool:
        """Whether `count` valid updates make a new model (`min_train_replies`); logs if not."""
        if count < max(1, self.min_train_replies):
            log.warning(
                "round %d: %d valid updates (< %d needed): keeping the previous model",
                server_round,
                count,
                max(1, self.min_train_replies),
            )
            return False
        return True

    def server_step(
        self,
        server_round: int,
        current: ArrayRecord | None,
        arrays: ArrayRecord | None,
        updates: list[ArrayRecord],
    ) -> ArrayRecord | None:
        """The server optimiser's step from `current` along `arrays - current`; None (keep the
        previous model, flagged) when the result holds NaN or Inf."""
        if arrays is not None and self.server_opt is not None and current is not None:
            arrays = self.server_opt.step(current, arrays, updates)
        if arrays is not None and not math.isfinite(update_norms([arrays], None)[0]):
            self.flag(
                server_round, None, "the aggregated model holds NaN or Inf: kept the previous model"
            )
            return None
        return arrays

    def unpack_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies with packed arrays unpacked in place (`validation.unpack_reply`, against
        the model each node was sent); a malformed one is rejected with its reason."""
        out = []
        for m in replies:
            node = m.metadata.src_node_id
            sent = self.arrays_for(node, self.current_arrays) if self.current_arrays else None
            if (why := unpack_reply(m, sent)) is not None:
                self.reject(server_round, node, why, "train")
            else:
                out.append(m)
        return out

    def _check_reported_numbers(self, server_round: int, valid: list[Message]) -> None:
        """Flag sizes that differ from the registered ones and losses the server's own
        validation loss contradicts; remember the loss each reply counts with (`loss_of`)."""
        self._round_loss = {}
        for m in valid:
            node, metrics = m.metadata.src_node_id, m.content[K.METRICS]
            if (why := size_flag(float(metrics[K.NUM_EXAMPLES]), self.node_size[node])) is not None:
                self.flag(server_round, node, why)
            src = int(metrics[K.SOURCE_INDEX])
            value, why = bounded_loss(
                reported_loss(metrics, self.loss_key), self.seen_loss(src), self.loss_tolerance
            )
            if why is not None:
                self.flag(server_round, node, why)
            self._round_loss[node] = value

    def seen_loss(self, source: int) -> float | None:
        """The last server-seen validation loss of `source` that compares with `loss_key`."""
        if self.loss_key == K.LOSS_BEFORE_BALANCED and source in self.val_loss_balanced:
            return self.val_loss_balanced[source]
        return self.val_loss.get(source)

    def train_summary(self, by_source: dict[int, dict[str, float]]) -> MetricRecord:
        """Means over the sources that trained (what Flower's hook reports)."""
        rows = list(by_source.values())
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
        """One message per node carrying `arrays_for(node)` (packed once per distinct model
        when `wire.pack`) and `config`."""
        packed: dict[int, tuple[ArrayRecord, ConfigRecord]] = {}
        out = []
        for n in nodes:
            model = self.arrays_for(n, arrays)
            content = RecordDict({K.CONFIG: config})
            if self.wire.pack:
                if id(model) not in packed:
                    packed[id(model)] = pack_record(model, self.wire.dtype)
                content[K.ARRAYS], content[K.LAYOUT] = packed[id(model)]
            else:
                content[K.ARRAYS] = model
            out.append(Message(content=content, message_type=kind, dst_node_id=n))
        return out

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
        """Flower's hook: `evaluate_round`'s summary."""
        return self.evaluate_round(server_round, replies).summary

    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> EvaluateRound:
        """Check the evaluate replies, remember each source's validation loss (`loss_of`'s
        reference), let the strategy move what the evaluation moves (`evaluated`)."""
        self._refusals()
        by_source: dict[int, dict[str, float]] = {}
        self.val_fresh = set()
        # (source, node) order, as in training: the round's row lists sources, and its refusals,
        # in this order, so metrics.jsonl does not depend on which site answered first
        for m in sorted(replies, key=_reply_order):
            node = m.metadata.src_node_id
            if (why := evaluate_reply_problem(m, self.node_source)) is not None:
                self.reject(server_round, node, why, "evaluate")
                continue
            metrics, dropped = evaluate_metrics(m.content[K.METRICS])
            for method, why in dropped.items():
                log.warning(
                    "round %d: node %s: %s-adapted scores left out: %s",
                    server_round,
                    node,
                    method,
                    why,
                )
            src = int(metrics[K.SOURCE_INDEX])
            by_source[src] = metrics
            self.val_loss[src] = metrics[K.LOSS]
            self.val_fresh.add(src)
            if K.LOSS_BALANCED in metrics:
                self.val_loss_balanced[src] = metrics[K.LOSS_BALANCED]
        self.evaluated(server_round, by_source)
        rejected, flagged = self._refusals()
        train_rows = [v for s, v in by_source.items() if s in self.train_sources]
        summary = (
            MetricRecord(
                {
                    "val-uar-mean": float(np.mean([r[K.UAR] for r in train_rows])),
                    "val-uar-worst": float(np.min([r[K.UAR] for r in train_rows])),
                }
            )
            if train_rows
            else None
        )
        return EvaluateRound(by_source, rejected, flagged, self.weights_by_source(), summary)

    # ---- checkpointed state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the checks need across a resume: recent update norms, last validation losses.

        Subclasses extend it (`{**super().state_dict(), ...}`).
        """
        return {
            "norm_history": list(self.norm_history),
            "val_loss": dict(self.val_loss),
            "val_fresh": sorted(self.val_fresh),
            "val_loss_balanced": dict(self.val_loss_balanced),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.norm_history = [float(x) for x in state.get("norm_history", [])]
        self.val_loss = {int(s): float(v) for s, v in state.get("val_loss", {}).items()}
        self.val_fresh = {int(s) for s in state.get("val_fresh", self.val_loss)}
        self.val_loss_balanced = {
            int(s): float(v) for s, v in state.get("val_loss_balanced", {}).items()
        }

    def weights_by_source(self) -> dict[int, float]:
        """The current mixing weight of each training source (what `lambda` logs)."""
        sizes = {s: self.round_sizes.get(s, 0.0) for s in self.train_sources}
        total = sum(sizes.values())
        if total <= 0:
            return {s: 1.0 / len(self.train_sources) for s in self.train_sources}
        return {s: v / total for s, v in sizes.items()}


def _reply_order(msg: Message) -> tuple[int, int]:
    """(source index, node id); replies without a readable source index sort first."""
    src = -1
    if not msg.has_error():
        metrics = msg.content.metric_records.get(K.METRICS)
        value = metrics.get(K.SOURCE_INDEX) if metrics is not None else None
        if isinstance(value, int | float) and math.isfinite(value):
            src = int(value)
    return src, int(msg.metadata.src_node_id)


def reported_loss(metrics: MetricRecord, key: str) -> float:
    """The chosen loss-before of a reply; the plain one when the client did not send it."""
    return float(metrics[key] if key in metrics else metrics[K.LOSS_BEFORE])


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
