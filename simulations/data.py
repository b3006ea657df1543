"""Inspect the configured data before training on it (any registered dataset).

    python -m simulations.data stats                       # clips and label histogram per split
    python -m simulations.data stats data=dfew data.root=PATH
    python -m simulations.data preview data.scale=0.2      # PNG grid: sources x classes x frames
    python -m simulations.data preview --split val --frames 6 --out grid.png
    python -m simulations.data prepare ...                 # raw videos to face crops (see prepare)

`stats` ends with one JSON line, {source: {split: {"clips": n, "labels": {class: n}}}}, so a site
can check its data (or a script can parse it) before it joins; `preview` prints the PNG path last.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from hdf.classes import EMOTIONS
from hdf.config import compose
from hdf.data import SPLITS, ClipDataset, Source, build_sources
from simulations import cli

USAGE = "usage: python -m simulations.data {stats,preview,prepare} [options] [hydra overrides]"


def _load(source: Source, split: str) -> ClipDataset:
    """The split's dataset, empty or not (stats reports an empty split instead of failing)."""
    return source.dataset.load_split(source.name, split, source.index)


def compute_stats(sources: Sequence[Source]) -> dict[str, dict[str, dict[str, Any]]]:
    """{source: {split: {"clips": n, "labels": {class name: n}}}} from the splits' labels."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for src in sources:
        out[src.name] = {}
        for split in SPLITS:
            labels = np.asarray(_load(src, split).labels, dtype=np.int64)
            counts = np.bincount(labels, minlength=len(EMOTIONS))
            out[src.name][split] = {
                "clips": len(labels),
                "labels": {name: int(counts[i]) for i, name in enumerate(EMOTIONS)},
            }
    return out


def print_stats(stats: dict[str, dict[str, dict[str, Any]]], data_name: str) -> None:
    """One rich table per source: a row per split, a column per class."""
    from rich.table import Table

    console = cli.console()
    for index, (name, splits) in enumerate(stats.items()):
        table = Table(title=f"[{index}] {name} ({data_name})", title_justify="left")
        table.add_column("split")
        table.add_column("clips", justify="right")
        for cls in EMOTIONS:
            table.add_column(cls, justify="right")
        for split, row in splits.items():
            table.add_row(split, str(row["clips"]), *(str(row["labels"][c]) for c in EMOTIONS))
        console.print(table)


def stats_main(cfg: DictConfig) -> dict[str, dict[str, dict[str, Any]]]:
    stats = compute_stats(build_sources(cfg.data))
    print_stats(stats, str(cfg.data.name))
    sys.stdout.flush()
    sys.stdout.write(json.dumps(stats) + "\n")  # plain write: never wrapped, always one line
    return stats


def preview_image(
    sources: Sequence[Source], split: str = "test", frames: int = 4, zoom: int = 2
) -> Any:
    """A PIL image: one row per source, one column block per class, `frames` frames per clip."""
    from PIL import Image, ImageDraw

    cells: list[list[torch.Tensor | None]] = []
    shape = None
    for src in sources:
        ds = _load(src, split)
        row: list[torch.Tensor | None] = []
        for c in range(len(EMOTIONS)):
            hits = np.flatnonzero(np.asarray(ds.labels) == c)
            if len(hits) == 0:
                row.append(None)
                continue
            clip = ds[int(hits[0])][0]  # T x C x H x W uint8
            pick = np.linspace(0, clip.shape[0] - 1, frames).round().astype(int)
            strip = torch.cat([clip[i] for i in pick], dim=-1)  # C x H x (frames * W)
            shape = strip.shape
            row.append(strip)
        cells.append(row)
    if shape is None:
        raise ValueError(f"no clips in the {split!r} split of any source; nothing to preview")
    _, h, w = shape
    label_w, head_h, gap = 110, 18, 6
    width = label_w + len(EMOTIONS) * (w * zoom + gap)
    height = head_h + len(sources) * (h * zoom + gap)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(EMOTIONS):
        draw.text((label_w + c * (w * zoom + gap) + 2, 3), name, fill=(0, 0, 0))
    for r, (src, row) in enumerate(zip(sources, cells, strict=True)):
        y = head_h + r * (h * zoom + gap)
        draw.text((4, y + h * zoom // 2 - 6), f"[{src.index}] {src.name}", fill=(0, 0, 0))
        for c, strip in enumerate(row):
            if strip is None:
                continue
            tile = Image.fromarray(strip.permute(1, 2, 0).contiguous().numpy())
            tile = tile.resize((w * zoom, h * zoom), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (w * zoom + gap), y))
    return canvas


def preview_main(cfg: DictConfig, split: str, frames: int, out: str | None) -> Path:
    path = (
        Path(out) if out else Path(str(cfg.output.root)) / "data" / f"{cfg.data.name}-{split}.png"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    size = int(cfg.data.size)
    preview_image(build_sources(cfg.data), split, frames, zoom=max(1, 96 // size)).save(path)
    print(path)
    return path


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "prepare":
        from simulations import prepare  # written separately; imported only when asked for

        return int(prepare.main(rest) or 0)
    if cmd == "stats":
        parser = argparse.ArgumentParser(prog="python -m simulations.data stats")
        parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=dfew")
        ns = parser.parse_args(rest)
        stats_main(compose(ns.overrides))
        return 0
    if cmd == "preview":
        parser = argparse.ArgumentParser(prog="python -m simulations.data preview")
        parser.add_argument("--split", default="test", choices=SPLITS)
        parser.add_argument("--frames", type=int, default=4, help="frames shown per clip")
        parser.add_argument("--out", default=None, help="PNG path (default: <output.root>/data/)")
        parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.scale=0.2")
        ns = parser.parse_args(rest)
        preview_main(compose(ns.overrides), ns.split, max(1, ns.frames), ns.out)
        return 0
    raise ValueError(f"unknown command {cmd!r}; {USAGE}")


if __name__ == "__main__":
    sys.exit(main())
