"""Generation speed of the synthetic benchmark: clips per second, no cache, fixed threads.

    python bench/bench_synthetic.py                 # 2 threads, T=8, 48x48, every default source
    python bench/bench_synthetic.py --threads 1 --scale 0.25

Prints one JSON object: overall and per-source clips per second (rendering, camera and JPEG
emulation included; the cache would make repeated loads free).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hdf.data.synthetic import DEFAULT_SOURCES, PRESETS, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=0.5, help="share of each train split")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # warm-up: first-call allocations and kernel selection are not generation speed
    generate(PRESETS["studio"], "val", seed=99, num_frames=args.frames, size=args.size, scale=0.1)
    per_source, total_clips, total_s = {}, 0, 0.0
    for name in DEFAULT_SOURCES:
        start = time.perf_counter()
        clips, _ = generate(
            PRESETS[name], "train", seed=0, num_frames=args.frames, size=args.size, scale=args.scale
        )
        elapsed = time.perf_counter() - start
        per_source[name] = round(len(clips) / elapsed, 1)
        total_clips += len(clips)
        total_s += elapsed
    print(
        json.dumps(
            {
                "benchmark": "synthetic_generation",
                "clips_per_s": round(total_clips / total_s, 1),
                "per_source_clips_per_s": per_source,
                "clips": total_clips,
                "seconds": round(total_s, 3),
                "threads": args.threads,
                "num_frames": args.frames,
                "size": args.size,
            }
        )
    )


if __name__ == "__main__":
    main()
