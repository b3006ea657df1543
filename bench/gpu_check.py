"""Every GPU check of issues 3 and 7 in one call, well under 8 minutes on one GPU.

    python -m bench.gpu_check                         # r3d_18 + DAM, 16x112x112, bf16, batch 16
    python -m bench.gpu_check --tiny --device cpu     # CPU smoke test of this script

Prints one JSON object:
- ``clips_per_s``: training clips per second of `hdf.train.train_local` (DSM + SAM, the default
  loss and optimiser) for r3d_18 + DAM and for r3d_18 without DAM (their ratio is DAM's cost);
- ``inference_clips_per_s``: eval-mode forward (``hdf.evaluate.predict``);
- ``gpu_busy_share``: the share of a local epoch's wall time in which a GPU kernel runs (from the
  torch profiler's kernel intervals, merged), the data loader and the host included; goal >= 0.8;
- peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from hdf.config import compose, model_settings, settings
from hdf.data.source import TensorClipDataset
from hdf.evaluate import predict
from hdf.models import build_model
from hdf.train import train_local


def _busy_share(prof: Any, wall: float) -> float | None:
    """Union of the device kernels' intervals over the wall time (None if no kernel was seen)."""
    spans = []
    for e in prof.events():
        dev = getattr(e, "device_type", None)
        if dev is not None and "CUDA" in str(dev) and e.time_range.elapsed_us() > 0:
            spans.append((e.time_range.start, e.time_range.end))
    if not spans:
        return None
    spans.sort()
    busy, (s0, e0) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > e0:
            busy += e0 - s0
            s0, e0 = s, e
        else:
            e0 = max(e0, e)
    busy += e0 - s0
    return busy / 1e6 / wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny3d, T=4, 32x32 (smoke test)")
    p.add_argument("--clips", type=int, default=256, help="clips per timed epoch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=4, help="data-loader workers")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    device = torch.device(args.device)
    if args.tiny:
        overrides = ["model=tiny3d", "model.width=4", "data.num_frames=4", "data.size=32"]
        clips_n = min(args.clips, 32)
    else:
        overrides = ["model=r3d_18", "data.num_frames=16", "data.size=112"]
        clips_n = args.clips
    precision = "bf16" if device.type == "cuda" else "fp32"
    overrides += [
        f"train.batch_size={args.batch_size}",
        f"precision={precision}",
        f"train.num_workers={args.workers if device.type == 'cuda' else 0}",
        f"model.channels_last={str(device.type == 'cuda').lower()}",
    ]
    cfg = compose(overrides)
    t, size = int(cfg.data.num_frames), int(cfg.data.size)
    g = torch.Generator().manual_seed(0)
    # clips at 1.25x the model size: preprocessing resizes them, as with real data
    raw = int(size * 1.25)
    clips = torch.randint(0, 256, (clips_n, t, 3, raw, raw), generator=g, dtype=torch.uint8)
    data = TensorClipDataset(clips, np.arange(clips_n) % 7, source_index=0)
    warm = TensorClipDataset(clips[: 2 * args.batch_size], np.arange(2 * args.batch_size) % 7, 0)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": overrides,
        "clips_per_epoch": clips_n,
        "clip": [t, size, size],
    }

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rates: dict[str, float] = {}
    for dam in (True, False):
        cfg.model.dam.enabled = dam
        torch.manual_seed(0)
        model = build_model(model_settings(cfg.model), t, size).to(device)
        train_local(
            model, warm, settings(cfg), device, epochs=1, lr=1e-4, seed=0
        )  # warm-up, autotune
        sync()
        t0 = time.perf_counter()
        train_local(model, data, settings(cfg), device, epochs=1, lr=1e-4, seed=1)
        sync()
        rates["dam" if dam else "no_dam"] = clips_n / (time.perf_counter() - t0)
        if dam:
            predict(model, warm, device, batch_size=32, precision=precision)
            sync()
            t0 = time.perf_counter()
            predict(model, data, device, batch_size=32, precision=precision)
            sync()
            out["inference_clips_per_s"] = round(clips_n / (time.perf_counter() - t0), 1)
            # one more local epoch under the profiler: how much of it the GPU is busy
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(ProfilerActivity.CUDA)
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                train_local(model, data, settings(cfg), device, epochs=1, lr=1e-4, seed=2)
                sync()
                wall = time.perf_counter() - t0
            share = _busy_share(prof, wall)
            out["gpu_busy_share"] = None if share is None else round(share, 3)
            out["profiled_epoch_s"] = round(wall, 2)
            if device.type == "cuda":
                out["peak_gpu_memory_gib"] = round(
                    torch.cuda.max_memory_allocated(device) / 2**30, 2
                )
        del model
    out["clips_per_s"] = {k: round(v, 1) for k, v in rates.items()}
    out["ratio"] = round(rates["no_dam"] / rates["dam"], 3)
    out["ratio_meaning"] = "training step time with DAM over without (r3d_18, DSM + SAM both)"
    out["goals"] = {"gpu_busy_share": 0.8, "dam_ratio": 1.15}
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
