"""Server-side optimisation of the mixed update: FedAvgM, FedAdam, FedYogi (Reddi et al., 2021).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2); Hsu et al., "Measuring
the Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019.

Whatever a strategy mixes (FedAvg's weighted mean, a DRO mix, q-FedAvg's step), the difference
`delta = mix - global` is a pseudo-gradient (a descent direction), and the server takes its own
step with it, x the global model:

- ``none``: x + lr * delta (lr = 1 is the mix itself; lr < 1 a damped server step)
- ``avgm``: m = momentum * m + delta; x + lr * m (FedAvgM)
- ``adam``: m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2; x + lr * m / (sqrt(v) + tau)
- ``yogi``: as adam, with v = v - (1 - b2) delta^2 sign(v - delta^2) (FedYogi)

With ``mask_tau`` (gradient masked averaging, Tenison et al., "Gradient Masked Averaging for
Federated Learning", TMLR 2023) delta is first scaled weight by weight by the sites' sign
agreement A = |mean_k sign(u_k - x)| over the replies' models u_k: 1 where A >= mask_tau, A
elsewhere. A direction every site takes keeps its full step; one the sites split on is damped,
which the paper argues keeps the mechanisms the sources share and drops the ones they do not.

m and v start at 0 and, as in the paper's Algorithm 2, there is no bias correction (Flower's
FedAdam adds one). Only the weights take the step: BatchNorm running statistics and counters
(the model's buffers) and any non-float array take the mix as it is. They are estimates of the
data, not weights descending a loss: an adaptive step would move a running variance by about lr
per round whatever its scale, and momentum would carry last round's statistics into this one's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from hdf.config.schema import ServerOptConfig
from server.arrays import array_view

SERVER_OPTIMIZERS = ("none", "avgm", "adam", "yogi")


@dataclass
class ServerOptSettings(ServerOptConfig):
    """The `server_opt` section (keys and defaults: hdf/config/schema.py), values checked."""

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"unknown server_opt.name {self.name!r}; use one of {list(SERVER_OPTIMIZERS)}"
            )
        if not self.lr > 0:
            raise ValueError(f"server_opt.lr must be > 0, got {self.lr}")
        for key in ("momentum", "beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"server_opt.{key} must be in [0, 1), got {getattr(self, key)}")
        if not self.tau > 0:
            raise ValueError(f"server_opt.tau must be > 0, got {self.tau}")
        if self.mask_tau is not None and not 0.0 < self.mask_tau <= 1.0:
            raise ValueError(
                f"server_opt.mask_tau must be in (0, 1] (or null: no mask), got {self.mask_tau}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ServerOptSettings:
        """Settings from the `server_opt` config mapping; an unknown key is named."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown server_opt key(s) {unknown}; known: {sorted(known)}")
        return cls(
            **{k: (str(v) if k == "name" else float(v)) for k, v in cfg.items() if v is not None}
        )


def avgm_step(
    x: np.ndarray, delta: np.ndarray, m: np.ndarray, lr: float, momentum: float
) -> tuple[np.ndarray, np.ndarray]:
    """FedAvgM: (x + lr * m_new, m_new) with m_new = momentum * m + delta."""
    m = momentum * m + delta
    return x + lr * m, m


def adam_step(
    x: np.ndarray,
    delta: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    *,
    yogi: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedAdam (or FedYogi with ``yogi``): (x_new, m_new, v_new), Reddi et al. Algorithm 2."""
    m = beta1 * m + (1 - beta1) * delta
    sq = delta * delta
    v = v - (1 - beta2) * sq * np.sign(v - sq) if yogi else beta2 * v + (1 - beta2) * sq
    return x + lr * m / (np.sqrt(v) + tau), m, v


def sign_agreement_mask(x: np.ndarray, updates: Sequence[np.ndarray], tau: float) -> np.ndarray:
    """FedGMA's soft mask: A = |mean_k sign(u_k - x)|, then 1 where A >= tau and A elsewhere."""
    votes = np.zeros(x.shape, dtype=np.float64)
    for u in updates:
        votes += np.sign(u - x)
    agreement = np.abs(votes) / len(updates)
    return np.where(agreement >= tau, 1.0, agreement)


class ServerOptimizer:
    """Applies `ServerOptSettings` key by key to (global, mix) ArrayRecords; keeps m and v.

    ``buffers``: keys that take the mix as it is (the model's buffers: BatchNorm running
    statistics and counters); non-float arrays always do.
    """

    def __init__(self, settings: ServerOptSettings, buffers: Collection[str] = ()) -> None:
        self.settings = settings
        self.buffers = frozenset(buffers)
        self.steps = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @property
    def identity(self) -> bool:
        """True when the step returns the mix unchanged (FedAvg's server)."""
        s = self.settings
        return s.name == "none" and s.lr == 1.0 and s.mask_tau is None

    def step(
        self, current: ArrayRecord, mixed: ArrayRecord, updates: Sequence[ArrayRecord] = ()
    ) -> ArrayRecord:
        """The new global model from the current one and the strategy's mix (`updates`: the
        replies' models, which `mask_tau` reads; without them there is no mask)."""
        if self.identity:
            return mixed
        s = self.settings
        out: dict[str, Array] = {}
        for key in mixed:
            new = array_view(mixed[key])
            if key in self.buffers or new.dtype.kind != "f":
                out[key] = mixed[key]
                continue
            x = array_view(current[key])
            delta = new - x
            if s.mask_tau is not None and updates:
                votes = [array_view(u[key]) for u in updates]
                delta = delta * sign_agreement_mask(x, votes, s.mask_tau).astype(x.dtype)
            if s.name == "none":
                y = x + s.lr * delta
            elif s.name == "avgm":
                y, self.m[key] = avgm_step(x, delta, self._zero(self.m, key, x), s.lr, s.momentum)
            else:
                m, v = self._zero(self.m, key, x), self._zero(self.v, key, x)
                y, self.m[key], self.v[key] = adam_step(
                    x, delta, m, v, s.lr, s.beta1, s.beta2, s.tau, yogi=s.name == "yogi"
                )
            out[key] = Array(np.asarray(y, dtype=new.dtype))
        self.steps += 1
        return ArrayRecord(out)

    @staticmethod
    def _zero(store: dict[str, np.ndarray], key: str, like: np.ndarray) -> np.ndarray:
        return store.get(key, np.zeros(like.shape, dtype=like.dtype))

    # ---- checkpointed state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.settings.name,
            "steps": self.steps,
            "m": {k: v.copy() for k, v in self.m.items()},
            "v": {k: v.copy() for k, v in self.v.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; a state of another server optimiser is an error."""
        if state.get("name") != self.settings.name:
            raise ValueError(
                f"the checkpoint's server optimiser is {state.get('name')!r}, the config's "
                f"server_opt.name is {self.settings.name!r}: resume with the run's own config"
            )
        self.steps = int(state["steps"])
        self.m = {k: np.array(v) for k, v in state["m"].items()}
        self.v = {k: np.array(v) for k, v in state["v"].items()}
