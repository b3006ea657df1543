"""The ClientApp: Flower's entry point at a site; the work is in `client.handlers`.

Flower starts a fresh process for every deployed message and imports this module first, so it
imports neither torch nor the model: `train` and `evaluate` load `client.handlers` when they
run, and `query` (node discovery) answers from the site's index (`client.site_index`) when it
has one, without torch (docs/deploy.md, "How fast a deployed round is"). A site that runs a
warm worker (node config `worker-socket`) has the message run there instead
(`client.worker_link`); without one reachable this process runs the handlers itself.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import site_index, worker_link
from hdf import contract as K

app = ClientApp()


def _handle(kind: str, msg: Message, context: Context) -> Message:
    """`client.handlers.<kind>` run by the site's warm worker, else in this process."""
    reply = worker_link.forward(kind, msg, context)
    if reply is None:
        from client import handlers

        return getattr(handlers, kind)(msg, context)
    if reply.content is None or reply.state is None:  # only a query's reply lacks them
        raise RuntimeError(f"the warm worker answered a {kind} message without its records")
    worker_link.apply_state(context, reply.state)
    return Message(content=reply.content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Score the received model, train it on this site's clips, send the update back."""
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this site's validation split (held-out sites: test)."""
    return _handle("evaluate", msg, context)


def _query_answer(msg: Message, context: Context, cfg_yaml: str) -> dict[str, int]:
    """The site's index, else the warm worker, else the handlers here (these load torch)."""
    node_config = dict(context.node_config)
    answer = site_index.read(cfg_yaml, node_config)
    if answer is not None:
        return answer
    reply = worker_link.forward("query", msg, context)
    if reply is not None:
        return site_index.checked(reply.answer)
    from client import handlers

    return handlers.query_answer(cfg_yaml, node_config)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which source this node serves, its size, and whether it is held out."""
    answer = _query_answer(msg, context, str(msg.content[K.CONFIG][K.RUN_CONFIG]))
    metrics = MetricRecord(
        {
            K.SOURCE_INDEX: answer["source"],
            K.NUM_EXAMPLES: answer["clips"],
            K.HELDOUT: answer["heldout"],
            K.NUM_PARTITIONS: int(context.node_config.get("num-partitions", 0)),
        }
    )
    return Message(content=RecordDict({K.METRICS: metrics}), reply_to=msg)
