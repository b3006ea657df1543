"""Distributionally robust aggregation over sources (Group DRO / AFL / DRFA lineage).

Each round the server raises the weight lambda_k of the sources whose loss under the current global
model (`loss-before`, measured by every client before it trains) is high, and mixes the updates
with those weights, so the worst-served source improves (docs/design.md §4). The modes and their
maths live in `server.strategy.dro_math` (registry `DRO_MODES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from hdf import contract as K
from hdf.seeding import round_seed
from server.strategy.base import SourceFedAvg, weighted_average
from server.strategy.dro_math import (
    ESTIMATES,
    DROSettings,
    ema,
    excess_loss,
    get_mode,
    on_capped_simplex,
    sample_by_weight,
    update_lambda,
)
from server.strategy.rounds import SourceReplies


class DRO(SourceFedAvg):
    """Source-weighted FedAvg whose weights solve the max over source mixtures.

    Every client **must** report `loss-before` (mean loss of the received model on a fixed
    sample of its training data, measured before local training) and `source-index`. The loss
    that moves lambda is the server-checked one (`SourceFedAvg.loss_of`: a report far above the
    source's server-seen validation loss of the same model is replaced by it), and lambda moves
    by at most `settings.max_step` per weight and round. A lambda that would leave the capped
    simplex (NaN, Inf) is refused: the previous one is kept and the round flagged.

    Modes (`dro_math.DRO_MODES`): ``eg`` exponentiated gradient (Group DRO), ``kl`` the KL-ball
    closed form p * exp(L / tau), ``cvar`` the worst alpha-share of sources, ``afl`` projected
    gradient ascent (AFL), ``drfa`` AFL's ascent with clients sampled by lambda (DRFA),
    ``regret`` EG on the excess loss over each source's own model (minimax regret).

    With sampling by lambda (DRFA), `fraction_train * K` sources are drawn with replacement in
    proportion to lambda each round (seeded by the round), every online node of a drawn source
    trains, and the update is the plain average over the draws (a source drawn twice counts
    twice): an unbiased estimate of the lambda-mix, as in DRFA. lambda then moves on the losses
    of the model the clients received measured on *every* source (estimate "val", DRFA's
    default): the per-source validation losses of the last evaluation (DRFA's uniformly sampled
    loss-reporting set, here all sources). The losses of only the sampled sources would be
    biased toward the sources lambda already favours.

    Parameters
    ----------
    mode : str (default: "eg")
        The lambda update, a key of `server.strategy.dro_math.DRO_MODES`.
    settings : DROSettings
        eta, eps (prior mixing), cap, loss clipping, the per-round bound on lambda's move and
        mode-specific values.
    prior : str (default: "uniform")
        "uniform", or "size" for proportional to each source's training clips.
    source_sizes : dict[int, int] | None
        Training clips per source (needed for the "size" prior).
    sample_by_lambda : bool | None (default: None)
        Sample clients by lambda (DRFA); None takes the mode's default (True for ``drfa``).
    loss : str (default: "plain")
        Which loss-before moves lambda: "plain" (mean CE of the sample) or "balanced" (the
        mean over classes of each class's CE, `loss-before-balanced`), which ranks sources the
        way UAR does; a reply without it falls back to the plain loss. Validation losses
        (estimate "val") are always plain.
    estimate : str | None (default: None)
        The per-source loss lambda moves on: "sample" (`loss-before`, the received model on a
        fixed 64-clip training sample) or "val" (the source's validation loss of the same model,
        from the evaluation that ended the previous round; a source without one falls back to
        its `loss-before` if it trained). None takes the mode's default (val for ``drfa`` and
        ``regret``).
    smoothing : float (default: 0.0)
        beta of an exponential moving average across rounds of that per-source signal
        (`dro_math.ema`); 0 uses each round's value as it is.

    Mode ``regret`` moves lambda on each source's excess loss (`dro_math.excess_loss`): the
    validation loss of the received model (last evaluation) minus the validation loss of the
    model the source trained from it this round (`local-val-loss`, asked for with `local-val`,
    as FedDG-GA does), clipped at 0. Both are losses on the source's validation split, so they
    compare like with like; a source missing either this round keeps its weight.

    The remaining keyword arguments are `SourceFedAvg`'s.
    """

    def __init__(
        self,
        *,
        mode: str = "eg",
        settings: DROSettings | None = None,
        prior: str = "uniform",
        source_sizes: dict[int, int] | None = None,
        sample_by_lambda: bool | None = None,
        loss: str = "plain",
        estimate: str | None = None,
        smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        spec = get_mode(mode)
        if loss not in LOSS_KEYS:
            raise ValueError(f"unknown DRO loss {loss!r}; use one of {sorted(LOSS_KEYS)}")
        self.estimate = spec.estimate if estimate is None else str(estimate)
        if self.estimate not in ESTIMATES:
            raise ValueError(
                f"unknown strategy.dro.estimate {self.estimate!r}; use one of {list(ESTIMATES)}"
            )
        if spec.excess and self.estimate != "val":
            raise ValueError(
                f"DRO mode {mode!r} compares validation losses (global vs local model): set "
                "strategy.dro.estimate=val (or null)"
            )
        if not 0.0 <= float(smoothing) < 1.0:
            raise ValueError(f"strategy.dro.smoothing={smoothing}: give a beta in [0, 1)")
        self.smoothing = float(smoothing)
        self.spec = spec
        self.loss_key = LOSS_KEYS[loss]
        self.mode = mode
        self.settings = settings or DROSettings()
        self.sample_by_lambda = (
            spec.sample_by_lambda if sample_by_lambda is None else bool(sample_by_lambda)
        )
        self.prior = make_prior(prior, self.train_sources, source_sizes)
        self.lam = self.prior.copy()
        self.loss_memory = np.full(len(self.train_sources), np.nan)  # last (smoothed) signal
        self.draws: dict[int, int] = {}  # source -> times drawn this round (sampling by lambda)

    # ---- sampling by lambda (DRFA) ------------------------------------------------------------
    def sample_training_nodes(self, server_round: int, nodes: list[int]) -> list[int]:
        if not self.sample_by_lambda:
            return super().sample_training_nodes(server_round, nodes)
        m = max(1, round(self.fraction_train * len(self.train_sources)))
        counts = sample_by_weight(self.lam, m, round_seed(self.seed, server_round))
        self.draws = {s: int(c) for s, c in zip(self.train_sources, counts, strict=True) if c > 0}
        return sorted(n for n in nodes if self.node_source.get(n) in self.draws)

    @property
    def eval_loss(self) -> np.ndarray:
        """Each training source's validation loss in the last evaluation (NaN: it was not
        scored then; a stale loss is no estimate of the current model)."""
        return np.array(
            [self.val_loss[s] if s in self.val_fresh else np.nan for s in self.train_sources]
        )

    # ---- aggregation ------------------------------------------------------------------------
    def _losses(self, replies: SourceReplies) -> tuple[np.ndarray, np.ndarray]:
        """Per-source checked loss this round (clip-weighted over a source's nodes) and mask."""
        idx = {s: i for i, s in enumerate(self.train_sources)}
        losses = np.zeros(len(self.train_sources))
        mask = np.zeros(len(self.train_sources), dtype=bool)
        for src, msgs in replies.by_source.items():
            n = np.array([self.size_of(m) for m in msgs])
            lb = np.array([self.loss_of(m) for m in msgs])
            losses[idx[src]] = float((n * lb).sum() / n.sum())
            mask[idx[src]] = True
        return losses, mask

    def _move_lambda(self, server_round: int, losses: np.ndarray, mask: np.ndarray) -> None:
        """lambda <- the mode's update, unless that leaves the capped simplex (then kept)."""
        new = update_lambda(
            self.mode, self.lam, losses, mask, self.prior, self.settings, self.loss_memory
        )
        if on_capped_simplex(new, self.settings.cap):
            self.lam = new
        else:
            self.flag(
                server_round, None, f"lambda update gave {new.tolist()}: kept {self.lam.tolist()}"
            )

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """Regret modes ask every client for its trained model's validation loss."""
        out = super().train_config(server_round, config)
        if self.spec.excess:
            out[K.LOCAL_VAL] = 1
        return out

    def _signal(self, replies: SourceReplies) -> tuple[np.ndarray, np.ndarray]:
        """The per-source value lambda moves on this round (before smoothing), and its mask."""
        reported, trained = self._losses(replies)
        known = np.isfinite(self.eval_loss)
        if self.spec.excess:
            local, has_local = self._local_val(replies)
            mask = has_local & known
            return np.where(mask, excess_loss(self.eval_loss, local), 0.0), mask
        if self.estimate == "val":
            return np.where(known, self.eval_loss, reported), known | trained
        return reported, trained

    def _local_val(self, replies: SourceReplies) -> tuple[np.ndarray, np.ndarray]:
        """Per-source `local-val-loss` this round (clip-weighted over a source's nodes), mask."""
        idx = {s: i for i, s in enumerate(self.train_sources)}
        out = np.full(len(self.train_sources), np.nan)
        for src, msgs in replies.by_source.items():
            msgs = [m for m in msgs if K.LOCAL_VAL_LOSS in m.content[K.METRICS]]
            if msgs:
                n = np.array([self.size_of(m) for m in msgs])
                v = np.array([float(m.content[K.METRICS][K.LOCAL_VAL_LOSS]) for m in msgs])
                out[idx[src]] = float((n * v).sum() / n.sum())
        return out, np.isfinite(out)

    def aggregate_updates(self, server_round: int, replies: SourceReplies) -> ArrayRecord | None:
        """Update lambda from the per-source signal, then mix the updates by lambda."""
        signal, mask = self._signal(replies)
        self.loss_memory = ema(self.loss_memory, signal, mask, self.smoothing)
        losses = np.where(mask, self.loss_memory, 0.0)
        self._move_lambda(server_round, losses, mask)
        # DRFA averages over the draws (made with the lambda before this update); the others
        # mix by the updated lambda.
        weights = (
            {s: float(c) for s, c in self.draws.items()}
            if self.sample_by_lambda
            else dict(zip(self.train_sources, self.lam, strict=True))
        )
        return mix_by_source(replies, weights, self.size_of)

    def train_summary(self, by_source: dict[int, dict[str, float]]) -> MetricRecord:
        out = super().train_summary(by_source)
        out["lambda-max"] = float(self.lam.max())
        return out

    def weights_by_source(self) -> dict[int, float]:
        return {s: float(w) for s, w in zip(self.train_sources, self.lam, strict=True)}

    # ---- checkpointed state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def by_source(v: np.ndarray) -> dict[int, float]:
            return {int(s): float(x) for s, x in zip(self.train_sources, v, strict=True)}

        return {
            **super().state_dict(),
            "lambda": by_source(self.lam),
            "loss_memory": by_source(self.loss_memory),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def vec(d: dict[int, float] | None) -> np.ndarray:
            if d is None:
                return np.full(len(self.train_sources), np.nan)
            return np.array([float(d.get(s, np.nan)) for s in self.train_sources])

        super().load_state_dict(state)
        self.lam = vec(state["lambda"])
        self.loss_memory = vec(state.get("loss_memory"))


LOSS_KEYS = {"plain": K.LOSS_BEFORE, "balanced": K.LOSS_BEFORE_BALANCED}


def mix_by_source(
    replies: SourceReplies,
    source_weight: dict[int, float],
    size_of: Callable[[Message], float],
) -> ArrayRecord:
    """Mix updates with a weight per source, renormalised over the sources that replied.

    Several nodes serving one source share its weight in proportion to their clips (`size_of`:
    the sizes registered at discovery).
    """
    records, weights = [], []
    for src, msgs in replies.by_source.items():
        n = np.array([size_of(m) for m in msgs])
        for m, share in zip(msgs, n / n.sum(), strict=True):
            records.append(m.content[K.ARRAYS])
            weights.append(source_weight.get(src, 0.0) * share)
    if sum(weights) <= 0:  # every replier has weight 0 (e.g. a source lambda drove to 0)
        weights = [1.0] * len(records)
    return weighted_average(records, weights)


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
