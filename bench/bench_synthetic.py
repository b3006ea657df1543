"""Generation speed of the synthetic benchmark: clips per second, no cache.

    python bench/bench_synthetic.py                 # T=8, 48x48, every default source
    python bench/bench_synthetic.py --scale 0.25

Generation always runs in one torch thread (GENERATOR_THREADS: a split must not depend on the
thread count of the process that generated it first), so there is no thread option.

Prints one JSON object: overall and per-source clips per second (rendering, camera and JPEG
emulation included; the cache would make repeated loads free).
"""

from __future__ import annotations

import argparse
import json
import time

from hdf.data.synthetic import DEFAULT_SOURCES, PRESETS, generate
from hdf.data.synthetic.generator import GENERATOR_THREADS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.5, help="share of each train split")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=48)
    args = parser.parse_args()
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
                "threads": GENERATOR_THREADS,
                "num_frames": args.frames,
                "size": args.size,
            }
        )
    )


if __name__ == "__main__":
    main()
