"""The ClientApp: translate Flower messages to `hdf` calls and back (DESIGN.md section 3).

Every message carries the resolved run config as YAML (`run-config`), so a site needs nothing
but its node config (which source, where its data lives) to take part in any run.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import Site, get_site
from hdf import contract as K
from hdf.classes import NUM_CLASSES
from hdf.evaluate import evaluate as evaluate_model
from hdf.models.hdf_net import norm_state_keys
from hdf.train import loss_on_sample, train_local

app = ClientApp()


def _site(msg: Message, context: Context) -> tuple[Site, ConfigRecord]:
    config = msg.content[K.CONFIG]
    return get_site(str(config[K.RUN_CONFIG]), dict(context.node_config)), config


def restore_local_norm(model: torch.nn.Module, context: Context) -> None:
    """FedBN: put this site's own normalization layers over the received ones (if it has any)."""
    if K.FEDBN_STATE in context.state.array_records:
        own = context.state[K.FEDBN_STATE].to_torch_state_dict()
        model.load_state_dict(own, strict=False)


def save_local_norm(model: torch.nn.Module, context: Context) -> None:
    """FedBN: keep this site's normalization layers in `context.state` for the next round."""
    keys = set(norm_state_keys(model))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}
    context.state[K.FEDBN_STATE] = ArrayRecord(state)


def round_seed(seed: int, server_round: int, source_index: int) -> int:
    """Seed of one client's local training in one round: reproducible and resumable."""
    return (seed * 1_000_003 + server_round * 1009 + source_index) % (2**31)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Score the received model on a fixed training sample, train locally, send the update."""
    site, config = _site(msg, context)
    if site.heldout:
        raise RuntimeError(
            f"source {site.source.name!r} is held out in this run and never trains; "
            "the server should only send it evaluate messages"
        )
    cfg = site.cfg
    site.model.load_state_dict(msg.content[K.ARRAYS].to_torch_state_dict())
    fedbn = int(config.get(K.FEDBN, 0)) == 1
    if fedbn:
        restore_local_norm(site.model, context)
    data = site.source.split("train")
    loss_before = loss_on_sample(
        site.model,
        data,
        site.device,
        num_clips=int(cfg.train.loss_before_clips),
        seed=int(cfg.seed),
        batch_size=int(cfg.eval.batch_size),
    )
    stats = train_local(
        site.model,
        data,
        cfg,
        site.device,
        epochs=int(config[K.LOCAL_EPOCHS]),
        lr=float(config[K.LR]),
        seed=round_seed(int(cfg.seed), int(config[K.SERVER_ROUND]), site.source.index),
        proximal_mu=float(config.get(K.PROXIMAL_MU, 0.0)),
    )
    if fedbn:
        save_local_norm(site.model, context)
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
    content = RecordDict({K.ARRAYS: ArrayRecord(site.model.state_dict()), K.METRICS: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this site's validation split (held-out sites: test)."""
    site, config = _site(msg, context)
    site.model.load_state_dict(msg.content[K.ARRAYS].to_torch_state_dict())
    if int(config.get(K.FEDBN, 0)) == 1 and not site.heldout:
        restore_local_norm(site.model, context)
    split = "test" if site.heldout else str(config.get(K.SPLIT, "val"))
    data = site.source.split(split)
    stats = evaluate_model(
        site.model,
        data,
        site.device,
        batch_size=int(site.cfg.eval.batch_size),
        precision=str(site.cfg.precision),
    )
    metrics: dict[str, int | float] = {
        K.NUM_EXAMPLES: int(stats["num_examples"]),
        K.SOURCE_INDEX: site.source.index,
        K.LOSS: float(stats["loss"]),
        K.LOSS_BALANCED: float(stats["loss_balanced"]),
        K.UAR: float(stats["uar"]),
        K.WAR: float(stats["war"]),
    }
    # Per-class recall; -1 marks a class absent from this split (MetricRecords hold numbers).
    for c in range(NUM_CLASSES):
        r = stats["recall"][c]
        metrics[f"{K.RECALL_PREFIX}{c}"] = -1.0 if math.isnan(r) else float(r)
    return Message(content=RecordDict({K.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which source this node serves, its size, and whether it is held out."""
    site, _ = _site(msg, context)
    split = "test" if site.heldout else "train"
    metrics = MetricRecord(
        {
            K.SOURCE_INDEX: site.source.index,
            K.NUM_EXAMPLES: len(site.source.split(split)),
            K.HELDOUT: int(site.heldout),
            K.NUM_PARTITIONS: int(context.node_config.get("num-partitions", 0)),
        }
    )
    return Message(content=RecordDict({K.METRICS: metrics}), reply_to=msg)
