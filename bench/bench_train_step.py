"""Training-step time of the default model: base, +DAM, +DSM, +SAM and all together (issue 3).

Usage: ``python -m bench.bench_train_step [--threads 2] [--steps 8] [--repeats 5] [overrides...]``
Prints one JSON object: seconds per step of each variant (the best of ``repeats`` interleaved
runs, each timing ``steps`` steps of `hdf.train.train_local` on random clips of the configured
size; the best is the least disturbed by other processes) and the ratios to base; and the same
in CPU seconds of this process (the median over the repeats), which other processes on a loaded
machine disturb far less than wall time (``--threads 1`` is what a simulated site uses).
Goals: DAM <= 1.15, DSM <= 1.05; SAM is ~2x by design (two passes).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from hdf.config import compose, model_settings, settings
from hdf.data.source import TensorClipDataset
from hdf.models import build_model
from hdf.train import train_local

# variant -> (DAM on, DSM terms on, SAM on); "base" is the backbone with plain label-smoothed CE.
VARIANTS = {
    "base": (False, False, False),
    "dam": (True, False, False),
    "dsm": (False, True, False),
    "sam": (False, False, True),
    "all": (True, True, True),
}


def _variant_cfg(cfg, dam: bool, dsm: bool, sam: bool):  # type: ignore[no-untyped-def]
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.model.dam.enabled = dam
    cfg.dsm.supcon = cfg.dsm.ib = cfg.dsm.balance = dsm
    cfg.sam.enabled = sam
    cfg.precision = "fp32"
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.width=8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base_cfg = compose(list(args.overrides))
    t, size, bs = int(base_cfg.data.num_frames), int(base_cfg.data.size), base_cfg.train.batch_size
    n = int(bs) * args.steps
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (n, t, 3, size, size), generator=g, dtype=torch.uint8)
    data = TensorClipDataset(clips, np.arange(n) % 7, source_index=0)

    models, cfgs = {}, {}
    for name, (dam, dsm, sam) in VARIANTS.items():
        cfgs[name] = _variant_cfg(base_cfg, dam, dsm, sam)
        torch.manual_seed(0)
        models[name] = build_model(model_settings(cfgs[name].model), t, size)
        train_local(
            models[name], data, settings(cfgs[name]), torch.device("cpu"), epochs=1, lr=1e-4, seed=0
        )

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name in VARIANTS:
            t0, c0 = time.perf_counter(), time.process_time()
            stats = train_local(
                models[name],
                data,
                settings(cfgs[name]),
                torch.device("cpu"),
                epochs=1,
                lr=1e-4,
                seed=r,
            )
            times[name].append((time.perf_counter() - t0) / stats["steps"])
            cpu[name].append((time.process_time() - c0) / stats["steps"])
    step = {name: min(v) for name, v in times.items()}
    cpu_step = {name: float(np.median(v)) for name, v in cpu.items()}
    print(
        json.dumps(
            {
                "model": str(base_cfg.model.backbone),
                "width": int(base_cfg.model.width),
                "clip": [t, size, size],
                "batch_size": int(bs),
                "threads": args.threads,
                "seconds_per_step": {k: round(v, 5) for k, v in step.items()},
                "ratio_to_base": {k: round(v / step["base"], 3) for k, v in step.items()},
                "cpu_seconds_per_step": {k: round(v, 5) for k, v in cpu_step.items()},
                "cpu_ratio_to_base": {
                    k: round(v / cpu_step["base"], 3) for k, v in cpu_step.items()
                },
                "goals": {"dam": 1.15, "dsm": 1.05, "sam": "~2 (two passes)"},
            }
        )
    )


if __name__ == "__main__":
    main()
