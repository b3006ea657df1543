"""Fair Resource Allocation in Federated Learning [Li, Sanjabi, Beirami, Smith, ICLR 2020].

Paper: https://openreview.net/pdf?id=ByexElSYDr
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy.qfedavg import compute_delta_and_h

from hdf import contract as K
from server.strategy.base import SourceFedAvg, weighted_average
from server.strategy.qffl_math import qffl_weights
from server.strategy.rounds import SourceReplies


class QFedAvg(SourceFedAvg):
    """q-FedAvg over sources, fed the loss the paper needs.

    Implementation based on https://openreview.net/pdf?id=ByexElSYDr, with Flower's own update
    (`flwr.serverapp.strategy.qfedavg.compute_delta_and_h`): Delta_k = F_k^q L (w - w_k),
    h_k = q F_k^(q-1) ||L (w - w_k)||^2 + L F_k^q, w <- w - sum_k Delta_k / sum_k h_k.

    F_k is `loss-before` (the *received* global model's loss on the client's training sample,
    "with respect to the starting point" in the authors' code), not the running training loss,
    as the server checked it (`SourceFedAvg.loss_of`); p_k come from the registered sizes.
    Flower's class cannot be used as is: it reads one loss key, and its in-place update fails on
    integer arrays (BatchNorm counters); here the update runs on the floating arrays only and the
    integer ones take the clip-weighted mean.

    Parameters
    ----------
    q : float (default: 0.1)
        Fairness exponent; 0 gives FedAvg.
    client_lr : float (default: 1e-3)
        The clients' learning rate; L = 1 / client_lr estimates the Lipschitz constant.
    lipschitz : float | None (default: None)
        Override L directly (the 1/lr estimate assumes plain SGD clients).
    weighted_by_examples : bool (default: True)
        Scale Delta_k and h_k by the source's share of clips p_k. Flower and the paper sample
        clients in proportion to p_k and average uniformly; with full participation the same
        objective sum_k p_k F_k^(q+1) / (q+1) needs p_k in the sums, and q = 0 is then exactly
        our size-weighted FedAvg.

    The remaining keyword arguments are `SourceFedAvg`'s.
    """

    def __init__(
        self,
        *,
        q: float = 0.1,
        client_lr: float = 1e-3,
        lipschitz: float | None = None,
        weighted_by_examples: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if q < 0:
            raise ValueError(f"q-FedAvg needs q >= 0, got {q}")
        self.q = float(q)
        self.L = float(lipschitz) if lipschitz else 1.0 / float(client_lr)
        self.weighted_by_examples = weighted_by_examples
        self.last_weights: dict[int, float] = {}

    def aggregate_updates(self, server_round: int, valid: SourceReplies) -> ArrayRecord | None:
        """w - sum_k p_k Delta_k / sum_k p_k h_k on floating arrays (q-FedAvg)."""
        assert self.current_arrays is not None, "configure_train sets the global arrays first"
        replies = valid.messages
        metrics = [m.content[K.METRICS] for m in replies]
        n = np.array([self.size_of(m) for m in replies])
        losses = np.array([self.loss_of(m) for m in replies])
        p = n / n.sum() if self.weighted_by_examples else np.full(len(replies), 1 / len(replies))
        new = qffl_update(
            {k: a.numpy() for k, a in self.current_arrays.items()},
            [{k: a.numpy() for k, a in m.content[K.ARRAYS].items()} for m in replies],
            losses,
            p,
            self.q,
            self.L,
        )
        ints = weighted_average([m.content[K.ARRAYS] for m in replies], n.tolist())
        out = {k: Array(v) if v is not None else ints[k] for k, v in new.items()}
        w = p * qffl_weights(losses, self.q)
        self.last_weights = {
            int(mr[K.SOURCE_INDEX]): float(x) for mr, x in zip(metrics, w / w.sum(), strict=True)
        }
        return ArrayRecord(out)

    def weights_by_source(self) -> dict[int, float]:
        """Each source's relative weight p_k F_k^q in the last q-FedAvg step."""
        if not self.last_weights:
            return super().weights_by_source()
        return {s: self.last_weights.get(s, 0.0) for s in self.train_sources}


def qffl_update(
    global_arrays: dict[str, np.ndarray],
    local_arrays: list[dict[str, np.ndarray]],
    losses: np.ndarray,
    p: np.ndarray,
    q: float,
    L: float,
) -> dict[str, np.ndarray | None]:
    """The q-FedAvg step on the floating arrays; integer arrays map to None (caller fills them).

    Delta_k and h_k come from Flower's `compute_delta_and_h` (on float64 copies, which it
    overwrites), each scaled by p_k; the new array is w - sum Delta / sum h, cast back.
    """
    keys = [k for k, v in global_arrays.items() if np.issubdtype(v.dtype, np.floating)]
    g = [global_arrays[k].astype(np.float64) for k in keys]
    sum_delta = [np.zeros_like(x) for x in g]
    sum_h = 0.0
    for local, loss, pk in zip(local_arrays, losses, p, strict=True):
        lw = [local[k].astype(np.float64) for k in keys]  # fresh copies: overwritten in place
        delta, h = compute_delta_and_h(g, lw, q, L, float(loss))
        for acc, d in zip(sum_delta, delta, strict=True):
            acc += pk * d
        sum_h += pk * h
    out: dict[str, np.ndarray | None] = dict.fromkeys(global_arrays)
    for k, w, d in zip(keys, g, sum_delta, strict=True):
        out[k] = np.asarray(w - d / sum_h, dtype=global_arrays[k].dtype)
    return out
