"""A site's optimiser state between rounds, kept in Flower's `context.state` (stateful client).

`train.keep_optimizer_state` keeps the base optimiser's per-parameter state (AdamW's moments and
step count, SGD's momentum) from one round to the next, so the moment estimates do not restart
at zero every round. The state is used again only when it was saved

- in the previous round (the round number is one less than this one's),
- by the same run (Flower run id and run config), and
- by the same kind of optimiser,

and dropped otherwise, with the reason logged. Why this rule: every round the received global
model differs from the site's own last model by the other sites' updates, which the moments
already average over (FedAvg with AdamW clients); a site that sat out rounds (partial
participation, DRFA sampling) or a state from another run describes gradients at a point the
model has since left by several aggregated steps, so the site starts afresh as it does today. A
resumed run is a new Flower run: its sites start from fresh moments (the state lives at the
sites, not in the server's checkpoint), so resume is bit-exact only with the option off.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from client.site import config_key
from hdf import contract as K
from hdf.npy import torch_state

log = logging.getLogger(__name__)


def run_key(context: Context, cfg_yaml: str) -> str:
    """Identity of the run a state belongs to: Flower's run id and the run config's hash."""
    return f"{context.run_id}:{config_key(cfg_yaml)}"


def restore_optimizer_state(
    context: Context, run: str, server_round: int, optimizer: str
) -> dict[str, torch.Tensor] | None:
    """The state saved in round `server_round - 1` of `run` by `optimizer`, else None."""
    if K.OPTIMIZER_META not in context.state.config_records:
        return None
    meta = context.state.config_records[K.OPTIMIZER_META]
    saved = (int(meta.get("round", -1)), str(meta.get("run", "")), str(meta.get("optimizer", "")))
    reason = None
    if saved[1] != run:
        reason = "it belongs to another run"
    elif saved[2] != optimizer:
        reason = f"it is {saved[2]}'s, this round trains with {optimizer}"
    elif saved[0] != server_round - 1:
        reason = f"it is from round {saved[0]}, not the previous round {server_round - 1}"
    if reason is not None or K.OPTIMIZER_STATE not in context.state.array_records:
        log.info("round %d: optimiser state dropped: %s", server_round, reason or "no arrays")
        drop_optimizer_state(context)
        return None
    return torch_state(context.state.array_records[K.OPTIMIZER_STATE])


def save_optimizer_state(
    context: Context, state: dict[str, torch.Tensor], run: str, server_round: int, optimizer: str
) -> None:
    """Keep `state` (from `train_local`) in `context.state` for the next round."""
    context.state[K.OPTIMIZER_STATE] = ArrayRecord(state)
    context.state[K.OPTIMIZER_META] = ConfigRecord(
        {"round": int(server_round), "run": run, "optimizer": optimizer}
    )


def drop_optimizer_state(context: Context) -> None:
    """Forget any kept optimiser state (a failed load or a state that no longer applies)."""
    for key in (K.OPTIMIZER_STATE, K.OPTIMIZER_META):
        if key in context.state:
            del context.state[key]
