"""The federated run: node discovery, the round loop, evaluation, logging, checkpoint and resume.

Flower's `Strategy.start` always begins at round 1 and keeps no state, so the loop is written here
with the strategy's own hooks (configure/aggregate train and evaluate), which makes resuming from
a checkpoint, round-0 evaluation and per-source logging possible (Flower has no built-in resume).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from hdf import contract as K
from hdf.adapt import check_methods
from hdf.classes import NUM_CLASSES
from hdf.config import model_settings
from hdf.data import build_sources, split_sources
from hdf.device import seed_everything, set_deterministic
from hdf.evaluate import summarize
from hdf.models import build_model
from hdf.npy import torch_state
from hdf.optim.schedule import fixed_norm_in_round, lr_of_round
from hdf.runfolder.averaging import ModelAverage, averaged_in_round, write_average
from hdf.runfolder.folder import RunFolder, rng_state, set_rng_state
from hdf.runfolder.report import format_row
from hdf.runfolder.selection import BestModel
from hdf.runfolder.tracking import Tracker
from server.arrays import WireFormat
from server.exchange import send_and_receive
from server.heldout import HeldoutEvaluator
from server.identity import SourceBinding, load_registry
from server.strategy import (
    ServerOptimizer,
    ServerOptSettings,
    SourceFedAvg,
    SourceSequential,
    build_strategy,
)
from server.strategy.rounds import Rejection, TrainRound
from server.validation import query_reply

log = logging.getLogger(__name__)
QUERY_TIMEOUT_S = 300.0  # a site builds its data set and model when first asked


Claims = dict[int, dict[str, int]]  # node id -> {source, heldout, clips, partitions}


def query_nodes(
    grid: Grid, cfg_yaml: str, nodes: list[int], heldout: set[int], num_sources: int
) -> tuple[Claims, dict[int, str]]:
    """Ask `nodes` which source each serves: (checked claims, node -> why its reply is refused).

    `heldout` and `num_sources` are the run's own view (`server.validation.query_reply`).
    """
    if not nodes:
        return {}, {}
    content = RecordDict({K.CONFIG: ConfigRecord({K.RUN_CONFIG: cfg_yaml})})
    msgs = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    found: Claims = {}
    refused: dict[int, str] = {}
    for reply in grid.send_and_receive(msgs, timeout=QUERY_TIMEOUT_S):
        claim = query_reply(reply, heldout, num_sources)
        if isinstance(claim, str):
            refused[reply.metadata.src_node_id] = claim
        else:
            found[reply.metadata.src_node_id] = claim
    return found, refused


def discover_nodes(
    grid: Grid, cfg_yaml: str, expected: int, wait_s: float, heldout: set[int], num_sources: int
) -> tuple[Claims, dict[int, str]]:
    """Query nodes until `expected` have answered or `wait_s` passed.

    In simulation every virtual node exists from the start and reports how many partitions the
    federation has, so discovery ends as soon as all of them answered, even when there are fewer
    than training sources (`flwr run .` starts 2 SuperNodes unless told otherwise).
    """
    deadline = time.monotonic() + wait_s
    found: Claims = {}
    refused: dict[int, str] = {}
    while True:
        new = [n for n in grid.get_node_ids() if n not in found and n not in refused]
        claims, bad = query_nodes(grid, cfg_yaml, new, heldout, num_sources)
        found.update(claims)
        refused.update(bad)
        if len(found) >= expected or is_simulation(found) or time.monotonic() >= deadline:
            return found, refused
        time.sleep(1.0)


def eval_row(metrics: dict[str, float], prefix: str = "") -> dict[str, Any]:
    """A source's checked evaluate metrics (`server.validation.evaluate_metrics`) as a
    metrics.jsonl row: loss, uar, war, and recall with None for an absent class (-1);
    `prefix` selects the scores after an adaptation (`adapted-<method>-`)."""
    row: dict[str, Any] = {k: metrics[prefix + k] for k in (K.LOSS, K.UAR, K.WAR)}
    recall = [metrics[f"{prefix}{K.RECALL_PREFIX}{c}"] for c in range(NUM_CLASSES)]
    row["recall"] = [None if r < 0 else r for r in recall]
    return row


def eval_rows(
    by_source: dict[int, dict[str, float]],
    train_sources: set[int],
    names: dict[int, str],
    methods: list[str],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """(training sources' rows, held-out sources' rows, {method: held-out rows after adaptation})
    from the checked evaluate metrics by source; only the configured `methods` are read."""
    train: dict[str, Any] = {}
    held: dict[str, Any] = {}
    adapted: dict[str, dict[str, Any]] = {}
    for src, m in by_source.items():
        if src in train_sources:
            train[names[src]] = eval_row(m)
            continue
        held[names[src]] = eval_row(m)
        for method in methods:  # an evaluation-only site's scores after adaptation, if sent
            if K.adapted_key(method, K.UAR) in m:
                adapted.setdefault(method, {})[names[src]] = eval_row(m, K.adapted_key(method, ""))
    return train, held, adapted


class Evaluation(NamedTuple):
    """The evaluation part of a round's row."""

    head: dict[str, Any]  # lambda, train, heldout, and heldout_adapted when adaptation is on
    rejected: list[dict[str, Any]]  # the evaluate replies refused
    flagged: list[dict[str, Any]]  # the numbers the evaluation replaced


def is_simulation(claims: Claims) -> bool:
    """Every node reported the same simulated federation size and all of them answered."""
    partitions = {v["partitions"] for v in claims.values()}
    return len(partitions) == 1 and 0 not in partitions and len(claims) >= min(partitions)


class Federation:
    """Everything one federated run holds between rounds."""

    def __init__(self, grid: Grid, cfg: DictConfig, run: RunFolder, console: Console | None = None):
        self.grid, self.cfg, self.run = grid, cfg, run
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        seed_everything(int(cfg.seed))
        if cfg.deterministic:  # the server scores held-out sources in this process
            set_deterministic(True)
        sources = build_sources(cfg.data)
        self.train_sources, self.heldout_sources = split_sources(
            sources, list(cfg.data.heldout), cfg.data.train
        )
        self.names = {s.index: s.name for s in sources}
        self.num_sources = len(sources)
        self.heldout_indices = {s.index for s in self.heldout_sources}
        registry_file = cfg.server.site_registry
        self.binding = SourceBinding(
            load_registry(registry_file, {s.name: s.index for s in sources})
            if registry_file
            else None
        )
        wire = WireFormat(  # checked before any node is asked anything
            pack=bool(cfg.server.wire_pack), dtype=str(cfg.server.wire_dtype)
        )
        model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
        self.arrays = ArrayRecord(model.state_dict())
        server_eval = str(cfg.server.heldout_eval) == "server"
        self.heldout_eval = HeldoutEvaluator(cfg, self.heldout_sources) if server_eval else None
        self.adapt_methods = check_methods(cfg.server.heldout_adapt)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heldout-eval")
        expected = len(self.train_sources) + (0 if server_eval else len(self.heldout_sources))
        claims, refused = discover_nodes(
            grid,
            self.cfg_yaml,
            expected,
            float(cfg.server.wait_for_nodes_s),
            self.heldout_indices,
            self.num_sources,
        )
        self.simulated = is_simulation(claims)
        if self.simulated and self.binding.registry is not None:
            raise ValueError(
                "server.site_registry binds deployed sites' registered keys; simulated nodes have "
                "random keys, so none would be accepted: set server.site_registry=null"
            )
        nodes, refused_claims, _ = self._bind(claims)
        sizes = {v["source"]: v["clips"] for v in nodes.values() if not v["heldout"]}
        buffers = [name for name, _ in model.named_buffers()]  # statistics, not weights
        self.strategy: SourceFedAvg = build_strategy(
            cfg.strategy,
            train_sources=[s.index for s in self.train_sources],
            source_names=self.names,
            seed=int(cfg.seed),
            source_sizes=sizes,
            server_opt=ServerOptimizer(ServerOptSettings.from_config(cfg.server_opt), buffers),
            buffers=buffers,
            loss_tolerance=float(cfg.server.loss_tolerance),
            wire=wire,
        )
        # nodes whose query reply was refused (asked again only under a new node id)
        self.refused_nodes: set[int] = set()
        refused_first = self._register(nodes, {**refused, **refused_claims}, [], server_round=0)
        missing = {s.name for s in self.train_sources} - {
            self.names[v["source"]] for v in nodes.values() if not v["heldout"]
        }
        simulated = bool(nodes) and all(v["partitions"] > 0 for v in nodes.values())
        if missing and (simulated or len(missing) == len(self.train_sources)):
            # Nothing could train, or a simulated node failed to start its source: fail now.
            raise ValueError(
                f"no node serves training source(s) {sorted(missing)}, so the run cannot train "
                "them; a node that could not load its source logged why above (in deployment, "
                "start the sites serving them; in simulation, one SuperNode per training "
                "source, e.g. --federation-config 'num-supernodes=N')"
            )
        if missing:
            self.console.print(
                f"[yellow]no node serves training source(s) {sorted(missing)}: they will not "
                "train until a site serving them connects[/]"
            )
        self.train_config = ConfigRecord(
            {
                K.RUN_CONFIG: self.cfg_yaml,
                K.LOCAL_EPOCHS: float(cfg.train.local_epochs),
            }
        )
        self.eval_config = ConfigRecord({K.RUN_CONFIG: self.cfg_yaml, K.SPLIT: "val"})
        self.tracker = Tracker(cfg, run)
        self.best = BestModel(run.path, self.cfg_yaml)
        self.average = ModelAverage()  # the late rounds' models (`server.average_after`)
        self.start_round = 1
        self.train_indices = {s.index for s in self.train_sources}
        # round 0's row, waiting for the evaluation of the initial model
        self.initial: dict[str, Any] = {
            "round": 0,
            "rejected": [r.row() for r in refused_first],
            "flagged": [],
            "seconds": 0.0,
        }
        # a round's row waiting for the evaluation of its model (`server.eval_in_train`)
        self.pending: dict[str, Any] | None = None

    def _bind(self, claims: Claims) -> tuple[Claims, dict[int, str], list[int]]:
        """(accepted claims, node -> why refused, nodes whose source went to a new node).

        `server.identity.SourceBinding` decides; in a simulation two nodes claiming one source
        raise `DuplicateSource` before round 1.
        """
        keys: dict[int, bytes] = {}
        if self.binding.registry is not None:
            keys = {int(n.node_id): bytes(n.public_key) for n in self.grid.get_nodes()}
        online = set(self.grid.get_node_ids())
        accepted: Claims = {}
        refused: dict[int, str] = {}
        replaced: list[int] = []
        for node, v in sorted(claims.items()):
            why, gone = self.binding.claim(
                node, v["source"], key=keys.get(node), online=online, simulated=self.simulated
            )
            replaced += gone
            if why is None:
                accepted[node] = v
            else:
                refused[node] = why
        return accepted, refused, replaced

    def _register(
        self, nodes: Claims, refused: dict[int, str], replaced: list[int], server_round: int
    ) -> list[Rejection]:
        """Tell the strategy which node serves what; the refused query replies, for the row
        (their nodes have no registered source)."""
        for node in replaced:
            log.warning("node %s no longer serves its source: a new node took it over", node)
            self.strategy.forget_node(node)
        for node, v in nodes.items():
            self.strategy.register_node(node, v["source"], bool(v["heldout"]), v["clips"])
        out = []
        for node, why in refused.items():
            log.warning("round %d: rejected query reply from node %s: %s", server_round, node, why)
            self.refused_nodes.add(node)
            out.append(Rejection(server_round, "query", node, None, why))
        return out

    # ---- resume ------------------------------------------------------------------------------
    def restore(self) -> bool:
        """Continue from the run folder's checkpoint, if there is one."""
        ckpt = self.run.load_checkpoint()
        if ckpt is None:
            return False
        self.arrays = ArrayRecord(ckpt["model"])
        self.strategy.load_state_dict(ckpt["strategy"])
        if self.strategy.server_opt is not None and ckpt.get("server_opt"):
            self.strategy.server_opt.load_state_dict(ckpt["server_opt"])
        self._restore_average(ckpt.get("average"), int(ckpt["round"]))
        set_rng_state(ckpt["rng"])
        self.start_round = int(ckpt["round"]) + 1
        self.run.truncate_metrics(int(ckpt["round"]))
        self.best.resume(self.run.read_metrics(), int(ckpt["round"]), ckpt["model"])
        self.console.print(f"resuming {self.run.path} after round {ckpt['round']}")
        return True

    def _restore_average(self, state: dict[str, Any] | None, last: int) -> None:
        """Continue the checkpoint's average when this run's window (`server.average_after` of
        its rounds, which an extended run changes) still holds its first round; otherwise the
        average starts again, and a warning says which rounds it lacks."""
        after, rounds = self.cfg.server.average_after, int(self.cfg.rounds)
        if state and averaged_in_round(after, int(state["first_round"]), rounds):
            self.average.load_state_dict(state)
            return
        missed = [r for r in range(1, last + 1) if averaged_in_round(after, r, rounds)]
        if missed or state:
            log.warning(
                "server.average_after=%s of %d rounds: the checkpoint's average (%s) does not "
                "fit this run's window, so the average starts again after round %d%s",
                after,
                rounds,
                f"from round {state['first_round']}" if state else "none",
                last,
                f" and lacks rounds {missed[0]}-{missed[-1]}" if missed else "",
            )

    def checkpoint(self, server_round: int) -> None:
        self.run.save_checkpoint(
            {
                "round": server_round,
                "model": torch_state(self.arrays),
                "strategy": self.strategy.state_dict(),
                "server_opt": (
                    self.strategy.server_opt.state_dict()
                    if self.strategy.server_opt is not None
                    else None
                ),
                "average": self.average.state_dict() if self.average.count else None,
                "rng": rng_state(),
                "config": self.cfg_yaml,
            }
        )

    # ---- one round ---------------------------------------------------------------------------
    def exchange(self, msgs: list[Message]) -> list[Message]:
        """Send `msgs` and collect the replies of one round (`server.exchange`)."""
        return send_and_receive(
            self.grid,
            msgs,
            float(self.cfg.server.round_timeout_s),
            float(self.cfg.server.reply_poll_s),
        )

    def start_scoring(self, arrays: ArrayRecord | None = None) -> Future | None:
        """Score the held-out sources on the server (in a thread) while the sites work."""
        if self.heldout_eval is None:
            return None
        return self._pool.submit(self.heldout_eval.score, self.arrays if arrays is None else arrays)

    def evaluate(self, server_round: int, arrays: ArrayRecord | None = None) -> Evaluation:
        """The evaluation of the current model (or of `arrays`), from an evaluate exchange of
        its own.

        The server scores its held-out sources in a thread while the clients evaluate, so the
        round waits for the slower of the two instead of their sum.
        """
        arrays = self.arrays if arrays is None else arrays
        scoring = self.start_scoring(arrays)
        msgs = list(
            self.strategy.configure_evaluate(server_round, arrays, self.eval_config, self.grid)
        )
        return self.scores(server_round, self.exchange(msgs), scoring)

    def scores(
        self, server_round: int, replies: list[Message], scoring: Future | None
    ) -> Evaluation:
        """A round's evaluate replies, as the strategy checked them, and the server's own
        held-out scores: the evaluation part of the round's row."""
        result = self.strategy.evaluate_round(server_round, replies)
        train, held, adapted = eval_rows(
            result.by_source, self.train_indices, self.names, self.adapt_methods
        )
        if scoring is not None:
            plain, by_method = scoring.result()
            for name, stats in plain.items():
                held[name] = summarize(stats)
            for method, by_source in by_method.items():
                adapted[method] = {n: summarize(s) for n, s in by_source.items()}
        # after the evaluation: FedDG-GA moves its weights there; DRO and FedAvg only in training
        lam = {self.names[s]: w for s, w in result.weights.items()}
        head = {"lambda": lam, "train": train, "heldout": held}
        if adapted:  # `heldout_adapted` ({method: {source: scores}}), when adaptation is on
            head["heldout_adapted"] = adapted
        return Evaluation(
            head, [r.row() for r in result.rejected], [f.row() for f in result.flagged]
        )

    def round(self, server_round: int) -> dict[str, Any]:
        """Train once. With a pending evaluation (`server.eval_in_train`, the previous round's
        model, which is the one this round sends) the same exchange carries it: training sites
        score the received model first (`score-first`), other sites get evaluate messages, and
        the previous round's row is finished before this round's update is mixed. Returns this
        round's row, pending its evaluation when it will come in the next exchange."""
        t0 = time.monotonic()
        # sites that (re)joined since the last round get new node ids: ask them who they are
        new = [
            n
            for n in self.grid.get_node_ids()
            if not self.strategy.knows(n) and n not in self.refused_nodes
        ]
        claims, refused = query_nodes(
            self.grid, self.cfg_yaml, new, self.heldout_indices, self.num_sources
        )
        nodes, refused_claims, replaced = self._bind(claims)
        refusals = self._register(nodes, {**refused, **refused_claims}, replaced, server_round)
        self.train_config[K.LR] = lr_of_round(self.cfg.train, server_round, int(self.cfg.rounds))
        fixed = fixed_norm_in_round(self.cfg.train, server_round, int(self.cfg.rounds))
        self.train_config[K.FIXED_NORM] = int(fixed)
        if isinstance(self.strategy, SourceSequential):
            # each site after the first trains another model than the one pending evaluation
            if self.pending is not None:
                self.finish(self.pending, self.evaluate(self.pending["round"]))
            trained, num_sent, num_replied = self.strategy.train_in_sequence(
                server_round, self.arrays, self.train_config, self.grid, self.exchange
            )
        else:
            trained, num_sent, num_replied = self.train_together(server_round)
        kept = trained.arrays is None
        if trained.arrays is not None:
            self.arrays = trained.arrays
        reports = {
            self.names[src]: {
                "loss_before": r[K.LOSS_BEFORE],
                "train_loss": r[K.TRAIN_LOSS],
                "train_uar": r.get(K.TRAIN_UAR),
                "update_norm": trained.update_norm[src],
            }
            for src, r in trained.by_source.items()
        }
        return {
            "round": server_round,
            "clients": reports,
            "sent": num_sent,
            "replied": num_replied,
            "rejected": [r.row() for r in (*refusals, *trained.rejected)],
            "flagged": [f.row() for f in trained.flagged],
            "kept_previous_model": kept,
            "seconds": time.monotonic() - t0,
        }

    def train_together(self, server_round: int) -> tuple[TrainRound, int, int]:
        """(the round's result, train messages sent, train replies): every sampled site trains
        the current model in one exchange, which also carries the pending evaluation when it
        can (`_fold_evaluation`)."""
        msgs = list(
            self.strategy.configure_train(server_round, self.arrays, self.train_config, self.grid)
        )
        folded = self._fold_evaluation(msgs) if self.pending is not None else None
        if self.pending is not None and folded is None:  # not foldable: evaluate on its own
            self.finish(self.pending, self.evaluate(self.pending["round"]))
        replies = self.exchange(msgs + (folded[0] if folded else []))
        train_replies = [m for m in replies if m.metadata.message_type == MessageType.TRAIN]
        if folded is not None and self.pending is not None:
            evals = [m for m in replies if m.metadata.message_type == MessageType.EVALUATE]
            evals += [evaluation_of(m) for m in train_replies]
            self.finish(self.pending, self.scores(self.pending["round"], evals, folded[1]))
        return self.strategy.train_round(server_round, train_replies), len(msgs), len(train_replies)

    def _fold_evaluation(self, train_msgs: list[Message]) -> tuple[list[Message], Any] | None:
        """(evaluate messages for the sites that do not train, the server's held-out scoring)
        for the pending evaluation of the current model, with `score-first` set on the train
        messages; None when some training site would not be evaluated (then it runs apart)."""
        evals = list(
            self.strategy.configure_evaluate(
                self.pending["round"], self.arrays, self.eval_config, self.grid
            )
        )
        trainers = {m.metadata.dst_node_id for m in train_msgs}
        if not trainers <= {m.metadata.dst_node_id for m in evals}:
            return None
        for m in train_msgs:
            m.content[K.CONFIG][K.SCORE_FIRST] = 1
        rest = [m for m in evals if m.metadata.dst_node_id not in trainers]
        return rest, self.start_scoring()

    def finish(self, row: dict[str, Any], evaluation: Evaluation) -> None:
        """Complete a round's row with its evaluation and write it (metrics.jsonl, tracker,
        console), checkpoint that round and offer its model to best.pt. The keys and their
        order are the same whether the evaluation came apart or folded into the next round;
        `rejected` and `flagged` list the round's query and training ones, then its evaluation's."""
        r = int(row["round"])
        tail = {k: row[k] for k in ("clients", "sent", "replied") if k in row}
        kept = {k: row[k] for k in ("kept_previous_model",) if k in row}
        done = {
            "round": r,
            **evaluation.head,
            **tail,
            "rejected": row["rejected"] + evaluation.rejected,
            "flagged": row["flagged"] + evaluation.flagged,
            **kept,
            "seconds": row["seconds"],
        }
        self.pending = None
        self.run.append_metrics(done)
        self.tracker.log(done)
        self.show(done)
        if averaged_in_round(self.cfg.server.average_after, r, int(self.cfg.rounds)):
            self.average.update(torch_state(self.arrays), r)
        self.checkpoint(r)
        self.best.offer(done, lambda: torch_state(self.arrays))

    def score_average(self) -> None:
        """Score the average of the late rounds' models in one evaluate exchange and keep it
        (average.pt, average.json). It runs after the last checkpoint, so a run resumed after
        its last round scores it again; the strategy's state is not saved after it."""
        t0 = time.monotonic()
        evaluation = self.evaluate(int(self.cfg.rounds), ArrayRecord(self.average.state()))
        row = {
            "round": self.average.last_round,
            **evaluation.head,
            "rejected": evaluation.rejected,
            "flagged": evaluation.flagged,
            "seconds": time.monotonic() - t0,
        }
        write_average(self.run.path, self.average, row, self.cfg_yaml)
        self.console.print(f"average of rounds {self.average.first_round}-{row['round']}:")
        self.show(row)

    def show(self, row: dict[str, Any]) -> None:
        self.console.print(format_row(row, int(self.cfg.rounds)))

    # ---- the whole run -----------------------------------------------------------------------
    def run_all(self) -> list[dict[str, Any]]:
        fold = bool(self.cfg.server.eval_in_train)
        if not self.restore():
            self.pending = self.initial
            if not fold:
                t0 = time.monotonic()
                evaluation = self.evaluate(0)
                self.pending["seconds"] = time.monotonic() - t0
                self.finish(self.pending, evaluation)
        for r in range(self.start_round, int(self.cfg.rounds) + 1):
            row = self.round(r)
            if fold:
                self.pending = row
            else:
                t0 = time.monotonic()
                evaluation = self.evaluate(r)
                row["seconds"] += time.monotonic() - t0
                self.finish(row, evaluation)
        if self.pending is not None:  # the last model's evaluation: one exchange of its own
            t0 = time.monotonic()
            evaluation = self.evaluate(self.pending["round"])
            self.pending["seconds"] += time.monotonic() - t0
            self.finish(self.pending, evaluation)
        if self.average.count:
            self.score_average()
        self._pool.shutdown()
        self.tracker.finish()
        self.run.mark_done()
        return self.run.read_metrics()


def evaluation_of(reply: Message) -> Message:
    """A train reply's scores of the model it received (`eval-metrics`, asked with
    `score-first`) as the evaluate reply of that node: its metrics, its error, or nothing (then
    validation refuses it as any evaluate reply without metrics)."""
    if reply.has_error():
        return Message(error=reply.error, metadata=reply.metadata)
    records = reply.content.metric_records
    content = RecordDict({K.METRICS: records[K.EVAL_METRICS]} if K.EVAL_METRICS in records else {})
    return Message(content=content, metadata=reply.metadata)


def run_federation(grid: Grid, cfg: DictConfig, run: RunFolder) -> list[dict[str, Any]]:
    """Run (or resume) the federation described by `cfg`, writing into `run`."""
    return Federation(grid, cfg, run).run_all()
