"""The pooled baseline: one model trained on all training sources' data at once.

    python -m simulations.centralized                 # same data, model and loss as `make run`
    python -m simulations.centralized rounds=20

One "round" is `train.local_epochs` passes over the pooled training data, with the same
optimiser, schedule and HDF loss a client uses, so a round costs what a federated round costs
in total. With `train.keep_optimizer_state` the optimiser state carries over from one round to
the next, as it does at a federated site. The run folder has the same metrics.jsonl contract as
a federated run (lambda holds each source's share of the pooled data); the last line printed is
its path.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from hdf.adapt import check_methods, evaluate_adapted
from hdf.config import compose
from hdf.config import settings as run_settings
from hdf.config.preflight import check_run
from hdf.data import ConcatClipDataset, Source, build_sources, split_sources
from hdf.device import resolve_device, seed_everything, set_deterministic
from hdf.evaluate import evaluate, summarize
from hdf.models import HDFNet, build_model
from hdf.optim.schedule import fixed_norm_in_round, lr_of_round
from hdf.runfolder.averaging import ModelAverage, averaged_in_round, write_average
from hdf.runfolder.folder import RunFolder, discarded_unless_trained
from hdf.runfolder.report import format_row, write_report
from hdf.runfolder.selection import BestModel
from hdf.runfolder.tracking import Tracker
from hdf.seeding import round_seed
from hdf.train import train_local
from simulations.cli import command


def score(
    model: HDFNet,
    sources: list[Source],
    split: str,
    device: torch.device,
    cfg: DictConfig,
    *,
    confusion: bool,
    adapt: str = "none",
) -> dict[str, dict[str, Any]]:
    """Each source's metrics on `split`, as metrics.jsonl stores them; with `adapt`, after
    adapting a copy of the model on each source's own unlabeled clips (as a held-out site
    would, `hdf.adapt`), so the pooled and the federated models are adapted alike."""
    out = {}
    for s in sources:
        kwargs = {"batch_size": int(cfg.eval.batch_size), "precision": str(cfg.precision)}
        if adapt == "none":
            stats = evaluate(model, s.split(split), device, **kwargs)
        else:
            settings = run_settings(cfg).adapt
            stats = evaluate_adapted(model, s.split(split), adapt, device, settings, **kwargs)
        out[s.name] = summarize(stats)
        if not confusion:
            del out[s.name]["confusion"]
    return out


def train_centralized(cfg: DictConfig, run: RunFolder, console: Console | None = None) -> RunFolder:
    """Train on the pooled training sources, scoring every source after each round."""
    console = console or Console(highlight=False, soft_wrap=True)
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    run.write_config(cfg_yaml)
    best = BestModel(run.path, cfg_yaml)  # selected on the training sources' validation only
    settings = run_settings(cfg)
    seed_everything(settings.seed)
    if settings.deterministic:  # false leaves torch's defaults as they are
        set_deterministic(True)
    train_sources, heldout = split_sources(
        build_sources(cfg.data), list(cfg.data.heldout), cfg.data.train
    )
    device = resolve_device(settings.device)
    model = build_model(settings.model, settings.data.num_frames, settings.data.size).to(device)
    pooled = ConcatClipDataset([s.split("train") for s in train_sources])
    share = {s.name: len(s.split("train")) / len(pooled) for s in train_sources}
    tracker = Tracker(cfg, run)
    optimizer_state = None  # only with train.keep_optimizer_state
    methods = check_methods(settings.server.heldout_adapt)
    average = ModelAverage()  # with server.average_after, as a federated run averages

    def scores(model: HDFNet) -> dict[str, Any]:
        """A row's scores of `model`: training sources' val, held-out test, after adaptation."""
        out = {
            "train": score(model, train_sources, "val", device, cfg, confusion=False),
            "heldout": score(model, heldout, "test", device, cfg, confusion=True),
        }
        adapted = {
            m: score(model, heldout, "test", device, cfg, confusion=True, adapt=m) for m in methods
        }
        if adapted and heldout:
            out["heldout_adapted"] = adapted
        return out

    for r in range(0, int(cfg.rounds) + 1):
        t0 = time.monotonic()
        if r > 0:
            stats = train_local(
                model,
                pooled,
                settings,
                device,
                epochs=float(cfg.train.local_epochs),
                lr=lr_of_round(settings.train, r, settings.rounds),
                seed=round_seed(int(cfg.seed), r),
                optimizer_state=optimizer_state,
                fixed_norm=fixed_norm_in_round(settings.train, r, settings.rounds),
            )
            optimizer_state = stats.get("optimizer_state")
        if averaged_in_round(settings.server.average_after, r, settings.rounds):
            average.update(model.state_dict(), r)
        row = {"round": r, "lambda": share, **scores(model)}
        row["seconds"] = time.monotonic() - t0
        run.append_metrics(row)
        best.offer(row, model.state_dict)
        tracker.log(row)
        console.print(format_row(row, int(cfg.rounds)))
    if average.count:  # scored like every round's model, BatchNorm statistics averaged too
        t0 = time.monotonic()
        model.load_state_dict(average.state())
        row = {"round": average.last_round, "lambda": share, **scores(model)}
        row["seconds"] = time.monotonic() - t0
        write_average(run.path, average, row, cfg_yaml)
        console.print(f"average of rounds {average.first_round}-{average.last_round}:")
        console.print(format_row(row, int(cfg.rounds)))
    tracker.finish()
    run.mark_done()
    write_report(run)
    return run


@command
def main(argv: list[str] | None = None) -> int:
    cfg = compose(["name=centralized", *(sys.argv[1:] if argv is None else argv)])
    check_run(cfg)
    run = RunFolder.create(cfg.output.root, str(cfg.name))
    with discarded_unless_trained(run, fresh=True):
        train_centralized(cfg, run)
    print(run.path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
