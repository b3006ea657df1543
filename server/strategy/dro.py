"""Distributionally robust aggregation over sources (Group DRO / AFL / DRFA lineage).

Each round the server raises the weight lambda_k of the sources whose loss under the current global
model (`loss-before`, measured by every client before it trains) is high, and mixes the updates
with those weights, so the worst-served source improves (DESIGN.md section 4). The modes and their
maths live in `server.strategy.dro_math` (registry `DRO_MODES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from hdf import contract as K
from server.strategy.base import SourceFedAvg, weighted_average
from server.strategy.dro_math import (
    DROSettings,
    get_mode,
    on_capped_simplex,
    round_seed,
    sample_by_weight,
    update_lambda,
)


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
    gradient ascent (AFL), ``drfa`` AFL's ascent with clients sampled by lambda (DRFA).

    With sampling by lambda (DRFA), `fraction_train * K` sources are drawn with replacement in
    proportion to lambda each round (seeded by the round), every online node of a drawn source
    trains, and the update is the plain average over the draws (a source drawn twice counts
    twice): an unbiased estimate of the lambda-mix, as in DRFA. lambda then moves on the losses
    of the model the clients received measured on *every* source: the per-source validation
    losses of the last evaluation (DRFA's uniformly sampled loss-reporting set, here all sources);
    a source without one falls back to its `loss-before` if it trained. The losses of only the
    sampled sources would be biased toward the sources lambda already favours.

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
    server_lr : float (default: 1.0)
        The new model is old + server_lr * (mix - old).
    sample_by_lambda : bool | None (default: None)
        Sample clients by lambda (DRFA); None takes the mode's default (True for ``drfa``).
    loss : str (default: "plain")
        Which loss-before moves lambda: "plain" (mean CE of the sample) or "balanced" (the
        mean over classes of each class's CE, `loss-before-balanced`), which ranks sources the
        way UAR does; a reply without it falls back to the plain loss. DRFA's validation
        losses are always plain.

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
        sample_by_lambda: bool | None = None,
        loss: str = "plain",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        spec = get_mode(mode)
        if loss not in LOSS_KEYS:
            raise ValueError(f"unknown DRO loss {loss!r}; use one of {sorted(LOSS_KEYS)}")
        self.loss_key = LOSS_KEYS[loss]  # what `loss_of` reads and checks
        self.mode = mode
        self.settings = settings or DROSettings()
        self.server_lr = server_lr
        self.sample_by_lambda = (
            spec.sample_by_lambda if sample_by_lambda is None else bool(sample_by_lambda)
        )
        self.prior = make_prior(prior, self.train_sources, source_sizes)
        self.lam = self.prior.copy()
        self.loss_memory = np.full(len(self.train_sources), np.nan)  # last loss of each source
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
        """Last server-seen validation loss of each training source (NaN: none yet)."""
        return np.array([self.val_loss.get(s, np.nan) for s in self.train_sources])

    # ---- aggregation ------------------------------------------------------------------------
    def _losses(self, replies: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        """Per-source checked loss this round (clip-weighted over a source's nodes) and mask."""
        idx = {s: i for i, s in enumerate(self.train_sources)}
        losses = np.zeros(len(self.train_sources))
        mask = np.zeros(len(self.train_sources), dtype=bool)
        for src, msgs in _by_source(replies).items():
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

    def aggregate_updates(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """Update lambda from the reported losses, then mix the updates by lambda."""
        reported, mask = self._losses(replies)
        if self.sample_by_lambda:
            # DRFA: average over the draws (made with the current lambda), then move lambda on
            # every source's last validation loss (this round's loss-before where there is none).
            draws = {s: float(c) for s, c in self.draws.items()}
            mixed = mix_by_source(replies, draws, self.size_of)
            eval_loss = self.eval_loss
            known = np.isfinite(eval_loss)
            self._move_lambda(server_round, np.where(known, eval_loss, reported), known | mask)
        else:
            self._move_lambda(server_round, reported, mask)
            weights = dict(zip(self.train_sources, self.lam, strict=True))
            mixed = mix_by_source(replies, weights, self.size_of)
        self.loss_memory = np.where(mask, reported, self.loss_memory)
        if self.server_lr == 1.0 or self.current_arrays is None:
            return mixed
        return interpolate(self.current_arrays, mixed, self.server_lr)

    def train_summary(self) -> MetricRecord:
        out = super().train_summary()
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


def _by_source(replies: list[Message]) -> dict[int, list[Message]]:
    out: dict[int, list[Message]] = {}
    for m in replies:
        out.setdefault(int(m.content[K.METRICS][K.SOURCE_INDEX]), []).append(m)
    return out


def mix_by_source(
    replies: list[Message],
    source_weight: dict[int, float],
    size_of: Callable[[Message], float],
) -> ArrayRecord:
    """Mix updates with a weight per source, renormalised over the sources that replied.

    Several nodes serving one source share its weight in proportion to their clips (`size_of`:
    the sizes registered at discovery).
    """
    records, weights = [], []
    for src, msgs in _by_source(replies).items():
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


def interpolate(old: ArrayRecord, new: ArrayRecord, lr: float) -> ArrayRecord:
    """old + lr * (new - old) for floating arrays (a server learning rate); others take new."""
    out = {}
    for key in new:
        o, n = old[key].numpy(), new[key].numpy()
        if np.issubdtype(n.dtype, np.floating):
            n = (o + lr * (n.astype(np.float64) - o)).astype(n.dtype)
        out[key] = Array(np.asarray(n))
    return ArrayRecord(out)
