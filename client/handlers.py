"""The ClientApp's work: translate Flower messages to `hdf` calls and back (docs/design.md §3).

`client.app` registers these handlers and imports this module (torch, the model, the data) only
for a message that needs it. Every message carries the resolved run config as YAML
(`run-config`), so a site needs nothing but its node config (which source, where its data
lives) to take part in any run.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import site_index
from client.optimizer_state import (
    drop_optimizer_state,
    restore_optimizer_state,
    run_key,
    save_optimizer_state,
)
from client.site import Site, get_site, resolve_source
from client.wire import received, reply_records
from hdf import contract as K
from hdf.adapt import check_methods, evaluate_adapted, recompute_site_stats
from hdf.classes import NUM_CLASSES
from hdf.config import load
from hdf.evaluate import evaluate as evaluate_model
from hdf.models.hdf_net import NORM_PARTS, norm_state_keys
from hdf.npy import torch_state
from hdf.optim.base import OptimizerStateError
from hdf.seeding import round_seed
from hdf.train import loss_on_sample, train_local

log = logging.getLogger(__name__)


def _site(
    msg: Message, context: Context, weights: dict[str, torch.Tensor]
) -> tuple[Site, ConfigRecord]:
    """The site, its model holding `weights` (the received model)."""
    config = msg.content[K.CONFIG]
    return get_site(str(config[K.RUN_CONFIG]), dict(context.node_config), weights), config


def local_norm_mode(config: ConfigRecord) -> str | None:
    """Which normalisation state this site keeps local ("all", "stats") or re-estimates
    ("recompute"), or None (all shared)."""
    mode = str(config.get(K.LOCAL_NORM, "none"))
    if mode == "none":
        return None
    if mode not in K.LOCAL_NORM_MODES:
        raise ValueError(f"{K.LOCAL_NORM}={mode!r} is not one of {', '.join(K.LOCAL_NORM_MODES)}")
    return mode


def own_norm(site: Site, context: Context, mode: str | None) -> None:
    """Give the received model this site's own normalisation state before it is scored:
    the kept layers ("all", "stats") or statistics re-estimated on its training clips."""
    if mode == "recompute":
        recompute_site_stats(
            site.model,
            site.source.split("train"),
            site.device,
            site.settings.adapt,
            seed=int(site.cfg.seed),
            precision=str(site.cfg.precision),
        )
    elif mode is not None:
        restore_local_norm(site.model, context)


def restore_local_norm(model: torch.nn.Module, context: Context) -> None:
    """Put this site's own normalization state over the received one (if it has kept any)."""
    if K.LOCAL_NORM_STATE in context.state.array_records:
        own = torch_state(context.state[K.LOCAL_NORM_STATE])
        model.load_state_dict(own, strict=False)


def save_local_norm(model: torch.nn.Module, context: Context, part: str = "all") -> None:
    """Keep this site's normalization layers (`part` as `norm_state_keys`) in `context.state`.

    FedBN keeps parameters and statistics; SiloBN only the running statistics, which every
    site's local training already normalised its batches with: scoring with the averaged
    statistics instead is what costs the odd sources most (measured: README, Results).
    """
    keys = set(norm_state_keys(model, part))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}
    context.state[K.LOCAL_NORM_STATE] = ArrayRecord(state)


def train(msg: Message, context: Context) -> Message:
    """Score the received model on a fixed training sample, train locally, send the update.

    With `score-first` the site first scores the received model on its validation split, as
    an evaluate message would, and replies those scores as `eval-metrics` too: the round's
    training and the evaluation of the model it starts from take one exchange.
    """
    got = received(msg.content)
    site, config = _site(msg, context, got.state)
    if site.heldout:
        raise RuntimeError(
            f"source {site.source.name!r} is held out in this run and never trains; "
            "the server should only send it evaluate messages"
        )
    cfg = site.cfg
    local_norm = local_norm_mode(config)
    own_norm(site, context, local_norm)
    scored = split_scores(site) if int(config.get(K.SCORE_FIRST, 0)) == 1 else None
    data = site.source.split("train")
    loss_before = loss_on_sample(
        site.model,
        data,
        site.device,
        num_clips=int(cfg.train.loss_before_clips),
        seed=int(cfg.seed),
        batch_size=int(cfg.eval.batch_size),
    )
    server_round = int(config[K.SERVER_ROUND])
    keep = site.settings.train.keep_optimizer_state
    optimizer = site.settings.train.optimizer
    run = run_key(context, str(config[K.RUN_CONFIG]))
    kept = restore_optimizer_state(context, run, server_round, optimizer) if keep else None
    fixed_norm = int(config.get(K.FIXED_NORM, 0)) == 1
    if fixed_norm and local_norm == "recompute":
        # FixBN trains with the statistics it was sent, not the ones this site scored with
        sent = {k: got.state[k] for k in norm_state_keys(site.model, "stats")}
        site.model.load_state_dict(sent, strict=False)

    def local(state: dict[str, torch.Tensor] | None) -> dict:
        return train_local(
            site.model,
            data,
            site.settings,
            site.device,
            epochs=float(config[K.LOCAL_EPOCHS]),
            lr=float(config[K.LR]),
            seed=round_seed(int(cfg.seed), server_round, site.source.index),
            proximal_mu=float(config.get(K.PROXIMAL_MU, 0.0)),
            optimizer_state=state,
            fixed_norm=fixed_norm,
        )

    try:
        stats = local(kept)
    except OptimizerStateError as err:  # raised before any step: the model is untouched
        log.warning("round %d: kept optimiser state dropped: %s", server_round, err)
        stats = local(None)
    if keep and stats.get("optimizer_state"):
        save_optimizer_state(context, stats["optimizer_state"], run, server_round, optimizer)
    elif keep:
        drop_optimizer_state(context)
    if local_norm in NORM_PARTS:
        save_local_norm(site.model, context, local_norm)
    metrics = MetricRecord(
        {
            K.NUM_EXAMPLES: len(data),
            K.SOURCE_INDEX: site.source.index,
            K.LOSS_BEFORE: loss_before.plain,
            K.LOSS_BEFORE_BALANCED: loss_before.balanced,
            K.TRAIN_LOSS: float(stats["loss"]),
            K.TRAIN_UAR: float(stats["uar"]),
            K.TRAIN_WAR: float(stats["war"]),
            K.SKIPPED_CLIPS: int(getattr(data, "skipped", 0)),
        }
    )
    if int(config.get(K.LOCAL_VAL, 0)) == 1:
        # FedDG-GA's "before" loss: the local model on the split the server's "after" uses.
        local = evaluate_model(
            site.model,
            site.source.split("val"),
            site.device,
            batch_size=int(cfg.eval.batch_size),
            precision=str(cfg.precision),
        )
        metrics[K.LOCAL_VAL_LOSS] = float(local["loss"])
    content = RecordDict({**reply_records(site.model.state_dict(), got), K.METRICS: metrics})
    if scored is not None:
        content[K.EVAL_METRICS] = MetricRecord(scored)
    return Message(content=content, reply_to=msg)


def split_scores(site: Site, split: str = "val") -> dict[str, int | float]:
    """The evaluate reply's metrics of the model as it is now, on `split` of this site."""
    cfg = site.cfg
    stats = evaluate_model(
        site.model,
        site.source.split(split),
        site.device,
        batch_size=int(cfg.eval.batch_size),
        precision=str(cfg.precision),
    )
    return {
        K.NUM_EXAMPLES: int(stats["num_examples"]),
        K.SOURCE_INDEX: site.source.index,
        **score_metrics(stats),
        K.LOSS_BALANCED: float(stats["loss_balanced"]),
    }


def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this site's validation split (held-out sites: test).

    A held-out (evaluation-only) site also scores the model after adapting it on its own
    unlabeled clips with each method of the run's `server.heldout_adapt` (`hdf.adapt`); only
    the scores go back (keys `adapted-<method>-...`), never the adapted weights.
    """
    site, config = _site(msg, context, received(msg.content).state)
    if not site.heldout:
        own_norm(site, context, local_norm_mode(config))
    split = "test" if site.heldout else str(config.get(K.SPLIT, "val"))
    metrics = split_scores(site, split)
    data = site.source.split(split)
    cfg = site.cfg
    batch_size, precision = int(cfg.eval.batch_size), str(cfg.precision)
    if site.heldout:
        for method in check_methods(site.settings.server.heldout_adapt):
            adapted = evaluate_adapted(
                site.model,
                data,
                method,
                site.device,
                site.settings.adapt,
                batch_size=batch_size,
                precision=precision,
            )
            metrics.update(score_metrics(adapted, K.adapted_key(method, "")))
    return Message(content=RecordDict({K.METRICS: MetricRecord(metrics)}), reply_to=msg)


def score_metrics(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Loss, UAR, WAR and per-class recall as metric keys (-1 marks a class absent from the
    split: MetricRecords hold numbers only)."""
    out = {prefix + K.LOSS: float(stats["loss"])}
    out[prefix + K.UAR] = float(stats["uar"])
    out[prefix + K.WAR] = float(stats["war"])
    for c in range(NUM_CLASSES):
        r = stats["recall"][c]
        out[f"{prefix}{K.RECALL_PREFIX}{c}"] = -1.0 if math.isnan(r) else float(r)
    return out


def query_answer(cfg_yaml: str, node_config: dict[str, Any]) -> dict[str, int]:
    """Which source this node serves, whether it is held out, and the clips of the split it
    uses (test for a held-out site, else train); indexed for the next query when the dataset's
    sizes follow from its config (`client.site_index`). Builds no model."""
    cfg = load(cfg_yaml, "the run config the server sent")
    source, heldout = resolve_source(cfg, node_config)
    answer = {
        "source": source.index,
        "heldout": int(heldout),
        "clips": len(source.split("test" if heldout else "train")),
    }
    if source.dataset.sizes_from_config:
        site_index.write(cfg_yaml, node_config, answer)
    return answer
