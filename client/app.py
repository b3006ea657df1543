"""The ClientApp: Flower's entry point at a site; the work is in `client.handlers`.

Flower starts a fresh process for every deployed message and imports this module first, so it
imports neither torch nor the model: `train` and `evaluate` load `client.handlers` when they
run, and `query` (node discovery) answers from the site's index (`client.site_index`) when it
has one, without torch (docs/deploy.md, "How fast a deployed round is").
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import site_index
from hdf import contract as K

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Score the received model, train it on this site's clips, send the update back."""
    from client import handlers

    return handlers.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this site's validation split (held-out sites: test)."""
    from client import handlers

    return handlers.evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which source this node serves, its size, and whether it is held out."""
    cfg_yaml = str(msg.content[K.CONFIG][K.RUN_CONFIG])
    node_config = dict(context.node_config)
    answer = site_index.read(cfg_yaml, node_config)
    if answer is None:
        from client import handlers

        answer = handlers.query_answer(cfg_yaml, node_config)
    metrics = MetricRecord(
        {
            K.SOURCE_INDEX: answer["source"],
            K.NUM_EXAMPLES: answer["clips"],
            K.HELDOUT: answer["heldout"],
            K.NUM_PARTITIONS: int(node_config.get("num-partitions", 0)),
        }
    )
    return Message(content=RecordDict({K.METRICS: metrics}), reply_to=msg)
