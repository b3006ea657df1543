"""The ClientApp: translate Flower messages to `hdf` calls and back (DESIGN.md section 3).

Every message carries the resolved run config as YAML (`run-config`), so a site needs nothing
but its node config (which source, where its data lives) to take part in any run.
"""

from __future__ import annotations

import math

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import Site, get_site
from hdf import contract as K
from hdf.classes import NUM_CLASSES
from hdf.evaluate import evaluate as evaluate_model
from hdf.train import loss_on_sample, train_local

app = ClientApp()


def _site(msg: Message, context: Context) -> tuple[Site, ConfigRecord]:
    config = msg.content[K.CONFIG]
    return get_site(str(config[K.RUN_CONFIG]), dict(context.node_config)), config


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
    metrics = MetricRecord(
        {
            K.NUM_EXAMPLES: len(data),
            K.SOURCE_INDEX: site.source.index,
            K.LOSS_BEFORE: float(loss_before),
            K.TRAIN_LOSS: float(stats["loss"]),
            K.TRAIN_UAR: float(stats["uar"]),
            K.TRAIN_WAR: float(stats["war"]),
            K.SKIPPED_CLIPS: int(getattr(data, "skipped", 0)),
        }
    )
    content = RecordDict({K.ARRAYS: ArrayRecord(site.model.state_dict()), K.METRICS: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this site's validation split (held-out sites: test)."""
    site, config = _site(msg, context)
    site.model.load_state_dict(msg.content[K.ARRAYS].to_torch_state_dict())
    split = "test" if site.heldout else str(config.get(K.SPLIT, "val"))
    data = site.source.split(split)
    stats = evaluate_model(
        site.model, data, site.device, batch_size=int(site.cfg.eval.batch_size)
    )
    metrics: dict[str, int | float] = {
        K.NUM_EXAMPLES: int(stats["num_examples"]),
        K.SOURCE_INDEX: site.source.index,
        K.LOSS: float(stats["loss"]),
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
        }
    )
    return Message(content=RecordDict({K.METRICS: metrics}), reply_to=msg)
