"""Score a trained model (a run folder or a checkpoint) on any data config, per source.

    python -m simulations.evaluate runs/<folder>                  # the run's held-out test split
    python -m simulations.evaluate runs/<folder> --split val
    python -m simulations.evaluate runs/<folder>/checkpoint.pt data.sources=[cctv,night_ir]
    python -m simulations.evaluate runs/<folder> data=manifest data.manifest=site.csv --out eval/
    python -m simulations.evaluate runs/<folder> --adapt bn      # AdaBN on each source first

The model config, T and the input size come from the checkpoint. The data config is the
checkpoint's, with the Hydra overrides given here applied on top (``data=<group>`` starts from that
group's file instead; T and size still default to the checkpoint's). Which sources are scored:
``--sources a,b`` if given; else every source of the data config when the overrides choose the data
(``data=<group>`` or ``data.sources=...``); else the run's held-out sources (all sources if none).
Exit codes: 0; 2 for a bad override, an unknown source, a model config the weights do not fit, or
a missing, unreadable or refused checkpoint or data file (one line on stderr). Writes report.md,
confusion PNGs and results.json into ``--out`` (default: a folder ``eval-...`` next to the
checkpoint). The last line printed is one JSON object ``{"uar", "war", "per_source": {source:
{"uar", "war"}}, "adapt"}``, whose top-level numbers pool every scored clip.

``--adapt bn|tent`` adapts the model on each scored source's own clips of the split, without their
labels, before scoring it (``hdf.adapt``: AdaBN statistics, or TENT on the normalisation affine
parameters; settings ``adapt.*`` from the checkpoint's config, overridable here); every source
starts from the checkpoint's weights. On a run folder whose run recorded ``heldout_adapted`` for
that method, the report compares with the run's own adapted numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hdf.adapt import METHODS as ADAPT_METHODS
from hdf.adapt import evaluate_adapted
from hdf.checkpoint import checkpoint_config, load_model, read_checkpoint
from hdf.classes import EMOTIONS
from hdf.config import compose, load, settings
from hdf.data import SPLITS, Source, build_sources
from hdf.device import resolve_device
from hdf.metrics import per_class_recall
from hdf.runfolder.folder import METRICS_FILE, RunFolder, clean
from hdf.runfolder.report import plot_confusion
from simulations import cli

# Overrides of these keys choose *which* data is scored, so every source it lists is scored.
_DATA_CHOICE_KEYS = {"data", "data.sources", "data.name", "data.manifest"}


def apply_overrides(base: dict[str, Any], overrides: list[str]) -> tuple[DictConfig, set[str]]:
    """`base` (a run config) with Hydra-syntax overrides applied; returns it and the keys set.

    A group choice (``data=manifest``) replaces that section by the group's file, keeping the
    checkpoint's ``num_frames`` and ``size`` unless they are overridden explicitly.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.create(base)
    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = {o.key_or_group for o in parsed}
    for o in parsed:
        if o.is_sweep_override():
            raise ValueError(f"{o.input_line!r}: sweeps are not supported here, give one value")
    for o in parsed:  # group choices first, as Hydra composes them before the dotted keys
        key = o.key_or_group
        if "." in key or o.is_delete() or key not in {"data", "model"}:
            continue
        fresh = compose([f"{key}={o.value()}"])[key]
        if key == "data":
            for k in ("num_frames", "size"):
                fresh[k] = cfg.data[k]
        cfg[key] = fresh
    for o in parsed:
        key = o.key_or_group
        if key in {"data", "model"}:
            continue
        if key in {"experiment", "strategy"} or key.startswith("strategy."):
            raise ValueError(
                f"{o.input_line!r}: evaluation uses the checkpoint's model and a data config; "
                "only data, model, device, precision, eval and adapt overrides apply"
            )
        if o.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            continue
        OmegaConf.update(cfg, key, o.value(), merge=False, force_add=True)
    return load(OmegaConf.to_container(cfg, resolve=True)), keys  # type: ignore[arg-type]


def pick_sources(
    sources: list[Source], cfg: DictConfig, keys: set[str], names: list[str] | None
) -> list[Source]:
    """The sources to score (rules in the module docstring); unknown names are errors."""
    known = [s.name for s in sources]
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--sources names unknown source(s) {unknown}; known: {known}")
        return [s for s in sources if s.name in names]
    chosen = bool(keys & _DATA_CHOICE_KEYS) and "data.heldout" not in keys
    heldout = [] if chosen else list(cfg.data.get("heldout") or [])
    unknown = [n for n in heldout if n not in known]
    if unknown:
        raise ValueError(f"data.heldout names unknown source(s) {unknown}; known: {known}")
    return [s for s in sources if s.name in heldout] or sources


def pooled(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """UAR, WAR, recall and confusion over every scored clip (the sum of the confusions)."""
    cm = sum(np.asarray(s["confusion"]) for s in stats.values())
    recall = per_class_recall(cm)
    n = int(cm.sum())
    return {
        "uar": float(np.nanmean(recall)) if n else 0.0,
        "war": float(np.trace(cm) / n) if n else 0.0,
        "recall": recall.tolist(),
        "confusion": cm,
        "num_examples": n,
    }


def logged_heldout(ckpt_file: Path, round_: int | None, adapt: str = "none") -> dict[str, Any]:
    """The run's own held-out numbers for the checkpoint's round, if metrics.jsonl is beside it
    (after adaptation `adapt`: the row's `heldout_adapted[adapt]`)."""
    if round_ is None or not (ckpt_file.parent / METRICS_FILE).is_file():
        return {}
    rows = [r for r in RunFolder(ckpt_file.parent).read_metrics() if r.get("round") == round_]
    if not rows:
        return {}
    if adapt == "none":
        return rows[-1].get("heldout", {})
    return rows[-1].get("heldout_adapted", {}).get(adapt, {})


def default_out(ckpt_file: Path, cfg: DictConfig, split: str, tag: list[str]) -> Path:
    """``eval-<data>-<split>`` next to the checkpoint, plus a hash of the overrides if any."""
    name = f"eval-{cfg.data.name}-{split}"
    if tag:
        name += "-" + hashlib.sha1("\n".join(tag).encode()).hexdigest()[:8]
    return ckpt_file.parent / name


def _pct(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def write_report(
    out: Path,
    title: str,
    stats: dict[str, dict[str, Any]],
    total: dict[str, Any],
    logged: dict[str, Any],
) -> Path:
    """report.md with the per-source and per-class tables and the confusion PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    has_logged = any(n in logged for n in stats)
    head = "| source | clips | UAR | WAR | loss |"
    rule = "|---|---|---|---|---|"
    if has_logged:
        head += " run's UAR | run's WAR |"
        rule += "---|---|"
    lines = [f"# {title}", "", "## Per source", "", head, rule]
    for n, s in stats.items():
        row = f"| {n} | {s['num_examples']} | {_pct(s['uar'])} | {_pct(s['war'])} "
        row += f"| {s['loss']:.3f} |"
        if has_logged:
            lg = logged.get(n, {})
            row += f" {_pct(lg.get('uar'))} | {_pct(lg.get('war'))} |"
        lines.append(row)
    uars = [s["uar"] for s in stats.values()]
    lines += [
        "",
        f"All {total['num_examples']} clips pooled: UAR {_pct(total['uar'])}, "
        f"WAR {_pct(total['war'])}. Mean UAR over sources {_pct(float(np.mean(uars)))}, "
        f"worst {_pct(min(uars))} ({min(stats, key=lambda k: stats[k]['uar'])}).",
        "",
        "## Per-class recall",
        "",
        "| source | " + " | ".join(EMOTIONS) + " |",
        "|---|" + "---|" * len(EMOTIONS),
    ]
    for n, s in [*stats.items(), ("all", total)]:
        lines.append(f"| {n} | " + " | ".join(_pct(r) for r in s["recall"]) + " |")
    lines += ["", "## Confusion matrices (rows: true, columns: predicted)", ""]
    parts = [*stats.items()] + ([("all", total)] if len(stats) > 1 else [])
    for n, s in parts:
        cm = np.asarray(s["confusion"])
        png = f"confusion_{n}.png"
        plot_confusion(cm.tolist(), f"{n}: UAR {_pct(s['uar'])}, WAR {_pct(s['war'])}", out / png)
        lines += [f"### {n}", "", "| true \\ predicted | " + " | ".join(EMOTIONS) + " |"]
        lines.append("|---|" + "---|" * len(EMOTIONS))
        for i, e in enumerate(EMOTIONS):
            lines.append(f"| {e} | " + " | ".join(str(int(v)) for v in cm[i]) + " |")
        lines += ["", f"![confusion {n}]({png})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_evaluation(
    checkpoint: str,
    overrides: list[str],
    split: str = "test",
    sources: list[str] | None = None,
    out: str | None = None,
    console: Console | None = None,
    adapt: str = "none",
) -> dict[str, Any]:
    """Score the checkpoint (each source after adaptation `adapt`) and write the report;
    returns the summary JSON object."""
    console = console or cli.console()
    ckpt, ckpt_file = read_checkpoint(checkpoint)
    # What an older version stored may hold keys this one dropped: they are left out (logged).
    saved = load(checkpoint_config(ckpt, ckpt_file), str(ckpt_file), drop_unknown=True)
    cfg, keys = apply_overrides(OmegaConf.to_container(saved), overrides)  # type: ignore[arg-type]
    run = settings(cfg)
    try:
        device = resolve_device(run.device)
    except RuntimeError as err:  # e.g. device=cuda on a machine without CUDA
        raise ValueError(str(err)) from None
    model_changed = any(k == "model" or k.startswith("model.") for k in keys)
    model_cfg = OmegaConf.to_container(cfg.model) if model_changed else None
    model, _ = load_model(ckpt_file, model_cfg=model_cfg, device=device)  # type: ignore[arg-type]
    if int(cfg.data.num_frames) != model.num_frames:
        raise ValueError(
            f"data.num_frames={cfg.data.num_frames} but the checkpoint's model was built for "
            f"T={model.num_frames} frames; drop the data.num_frames override"
        )
    picked = pick_sources(build_sources(cfg.data), cfg, keys, sources)
    if adapt not in ADAPT_METHODS:
        raise ValueError(f"--adapt {adapt!r}: use one of {list(ADAPT_METHODS)}")
    batch_size, precision = run.eval.batch_size, run.precision
    stats: dict[str, dict[str, Any]] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"scoring {split} split", total=len(picked))
        for s in picked:
            progress.update(task, description=f"{s.name} ({split})")
            stats[s.name] = evaluate_adapted(
                model, s.split(split), adapt, device, run.adapt, batch_size=batch_size,
                precision=precision,
            )  # fmt: skip
            progress.advance(task)
    total = pooled(stats)
    round_ = ckpt.get("round")
    logged = logged_heldout(ckpt_file, round_, adapt) if split == "test" else {}
    tag = [*overrides, *(f"--sources={n}" for n in sources or [])]
    tag += [f"--adapt={adapt}"] if adapt != "none" else []
    out_dir = Path(out) if out else default_out(ckpt_file, cfg, split, tag)
    title = f"Evaluation of {ckpt_file} (round {round_}) on {cfg.data.name}, {split} split"
    if adapt != "none":
        title += f", each source adapted on its unlabeled clips ({adapt})"
    report = write_report(out_dir, title, stats, total, logged)
    summary = {
        "uar": total["uar"],
        "war": total["war"],
        "per_source": {n: {"uar": s["uar"], "war": s["war"]} for n, s in stats.items()},
        "adapt": adapt,
    }
    details = {
        "checkpoint": str(ckpt_file),
        "round": round_,
        "split": split,
        "adapt": adapt,
        "adapt_settings": asdict(run.adapt) if adapt != "none" else None,
        "overrides": overrides,
        "data": OmegaConf.to_container(cfg.data),
        "pooled": total,
        "sources": {n: {k: v for k, v in s.items()} for n, s in stats.items()},
        "run_logged_heldout": {n: logged[n] for n in stats if n in logged},
    }
    (out_dir / "results.json").write_text(json.dumps(clean(details), indent=1) + "\n")

    table = Table(title=f"{cfg.data.name} / {split} (round {round_})")
    for col in ("source", "clips", "UAR", "WAR", "loss"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for n, s in stats.items():
        table.add_row(n, str(s["num_examples"]), _pct(s["uar"]), _pct(s["war"]), f"{s['loss']:.3f}")
    table.add_row("all", str(total["num_examples"]), _pct(total["uar"]), _pct(total["war"]), "")
    console.print(table)
    console.print(f"report: {report}")
    return summary


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.evaluate",
        description="Score a run folder or checkpoint on a data config, per source.",
    )
    parser.add_argument("checkpoint", help="run folder (runs/<folder>) or checkpoint file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.sources=[cctv]")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--sources", default="", help="comma-separated source names to score")
    parser.add_argument("--out", default=None, help="report folder (default: next to the ckpt)")
    parser.add_argument(
        "--adapt",
        default="none",
        choices=ADAPT_METHODS,
        help="adapt on each source's unlabeled clips before scoring: bn (AdaBN) or tent",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sources.split(",") if n.strip()] or None
    summary = run_evaluation(
        args.checkpoint,
        list(args.overrides),
        args.split,
        names,
        args.out,
        cli.console(),
        args.adapt,
    )
    print(json.dumps(clean(summary)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
