"""The data loader's clips per second vs. what the default training step consumes (issue 7, item 3).

Usage: ``python -m bench.bench_loader [--threads 2] [--repeats 3] [overrides...]``
Prints one JSON object. The loader is `train_local`'s own DataLoader (shuffle, batch, collate,
`train.num_workers`) over an in-memory clip set like the synthetic benchmark's, plus the uint8 ->
float preprocessing and augmentation the step does before the model; the step is `train_local`
with the configured model, DSM and SAM. Both are timed in one process, interleaved; best of repeats.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from hdf.config import compose, model_settings, settings
from hdf.data.source import TensorClipDataset
from hdf.models import build_model
from hdf.train import augment_batch, train_local


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = compose(list(args.overrides))
    cfg.precision = "fp32"
    t, size, bs = int(cfg.data.num_frames), int(cfg.data.size), int(cfg.train.batch_size)
    n = bs * args.steps
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (n, t, 3, size, size), generator=g, dtype=torch.uint8)
    data = TensorClipDataset(clips, np.arange(n) % 7, source_index=0)
    torch.manual_seed(0)
    model = build_model(model_settings(cfg.model), t, size)
    device = torch.device("cpu")

    def load_epoch() -> float:
        gen = torch.Generator().manual_seed(0)
        loader = DataLoader(
            data, batch_size=bs, shuffle=True, generator=gen, num_workers=int(cfg.train.num_workers)
        )
        t0 = time.perf_counter()
        for x, _, _ in loader:
            augment_batch(model.preprocess(x), gen, max_shift=max(1, size // 16))
        return time.perf_counter() - t0

    def train_epoch(seed: int) -> float:
        t0 = time.perf_counter()
        train_local(model, data, settings(cfg), device, epochs=1, lr=1e-4, seed=seed)
        return time.perf_counter() - t0

    load_epoch(), train_epoch(0)  # warm-up
    loads, trains = [], []
    for r in range(args.repeats):
        loads.append(load_epoch())
        trains.append(train_epoch(r + 1))
    load_cps, train_cps = n / min(loads), n / min(trains)
    print(
        json.dumps(
            {
                "loader_clips_per_s": round(load_cps, 1),
                "train_clips_per_s": round(train_cps, 1),
                "ratio": round(load_cps / train_cps, 2),
                "num_workers": int(cfg.train.num_workers),
                "clip": [t, size, size],
                "batch_size": bs,
                "threads": args.threads,
                "note": "train_local includes its own loading; the loader share of a step is "
                "1/ratio",
            }
        )
    )


if __name__ == "__main__":
    main()
