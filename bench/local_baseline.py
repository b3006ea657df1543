"""The local training a federated run contains, done without federation (bench/run_all.py).

    python -m bench.local_baseline [--parallel 2] [--with-eval] overrides...

For every round and every training source: `train_local` from the round's starting model, with
the same model, data, epochs, lr, seed and threads per client as the simulation's clients, run in a
pool of `parallel` worker processes (the simulation runs `cpu_count / num_cpus_per_client` clients
at a time). No Flower, no Ray, no aggregation: every round starts from the initial model, which
costs the same compute. ``--with-eval`` also does the extra passes a round's client does (the
`loss-before` sample and the validation split), to split the overhead into compute and machinery.
Prints one JSON object with the wall time (process start to end, like the simulation's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import get_context
from typing import Any

_T0 = time.monotonic()

_STATE: dict[str, Any] = {}


def _init(cfg_yaml: str) -> None:
    import torch

    from hdf.config import load, model_settings
    from hdf.data import build_sources, split_sources
    from hdf.models import build_model

    cfg = load(cfg_yaml)
    torch.set_num_threads(int(cfg.simulation.num_cpus_per_client))
    train, _ = split_sources(build_sources(cfg.data), list(cfg.data.heldout), cfg.data.train)
    torch.manual_seed(int(cfg.seed))
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    _STATE.update(
        cfg=cfg,
        sources=train,
        model=model,
        init={k: v.clone() for k, v in model.state_dict().items()},
    )


def _job(args: tuple[int, int, bool]) -> float:
    import torch

    from hdf.config import settings
    from hdf.evaluate import evaluate
    from hdf.seeding import round_seed
    from hdf.train import loss_on_sample, train_local

    server_round, pos, with_eval = args
    cfg, model, src = _STATE["cfg"], _STATE["model"], _STATE["sources"][pos]
    model.load_state_dict(_STATE["init"])
    device = torch.device("cpu")
    data = src.split("train")
    t0 = time.perf_counter()
    if with_eval:
        loss_on_sample(
            model,
            data,
            device,
            num_clips=int(cfg.train.loss_before_clips),
            seed=int(cfg.seed),
            batch_size=int(cfg.eval.batch_size),
        )
    train_local(
        model,
        data,
        settings(cfg),
        device,
        epochs=float(cfg.train.local_epochs),
        lr=float(cfg.train.lr),
        seed=round_seed(int(cfg.seed), server_round, src.index),
    )
    if with_eval:
        evaluate(model, src.split("val"), device, batch_size=int(cfg.eval.batch_size))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parallel", type=int, default=0, help="0: cpu_count / num_cpus_per_client")
    p.add_argument("--with-eval", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from omegaconf import OmegaConf

    from hdf.config import compose
    from hdf.data import build_sources, split_sources

    cfg = compose(args.overrides)
    train, _ = split_sources(build_sources(cfg.data), list(cfg.data.heldout), cfg.data.train)
    per = max(1, int(cfg.simulation.num_cpus_per_client))
    parallel = args.parallel or max(1, (os.cpu_count() or 1) // per)
    jobs = [
        (r, i, args.with_eval) for r in range(1, int(cfg.rounds) + 1) for i in range(len(train))
    ]
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    with get_context("spawn").Pool(parallel, initializer=_init, initargs=(cfg_yaml,)) as pool:
        busy = pool.map(_job, jobs, chunksize=1)
    print(
        json.dumps(
            {
                "wall_s": time.monotonic() - _T0,
                "jobs": len(jobs),
                "parallel": parallel,
                "job_seconds_sum": sum(busy),
                "with_eval": args.with_eval,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
