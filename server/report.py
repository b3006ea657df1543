"""A run's report.md (tables) and PNG plots, made from its metrics.jsonl alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from hdf.classes import EMOTIONS
from server.outputs import RunFolder


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_row(row: dict[str, Any], rounds: int) -> str:
    """One progress line per round: clients, losses, lambda, worst source, held-out UAR."""
    train, held = row["train"], row["heldout"]
    parts = [f"round {row['round']:>3}/{rounds}"]
    if "replied" in row:
        bad = sum(r.get("kind", "train") == "train" for r in row["rejected"])
        parts.append(f"updates {row['replied'] - bad}/{row['sent']}")
        if row.get("flagged"):
            parts.append(f"flagged {len(row['flagged'])}")
        if row["clients"]:
            lb = [c["loss_before"] for c in row["clients"].values()]
            parts.append(f"loss-before mean {np.mean(lb):.3f} max {np.max(lb):.3f}")
    if row.get("lambda"):
        top = max(row["lambda"], key=row["lambda"].get)
        parts.append(f"λmax {row['lambda'][top]:.2f} ({top})")
    if train:
        worst = min(train, key=lambda n: train[n]["uar"])
        mean = np.mean([v["uar"] for v in train.values()])
        parts.append(f"val UAR mean {mean:.3f} worst {train[worst]['uar']:.3f} ({worst})")
    for name, v in held.items():
        parts.append(f"held-out {name} UAR {v['uar']:.3f}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


def plot_series(
    rows: list[dict[str, Any]], key: str, field: str | None, title: str, ylabel: str, path: Path
) -> None:
    """One line per source of `row[key][source][field]` (or `row[key][source]`) over rounds."""
    names = sorted({n for r in rows for n in r.get(key, {})})
    if not names:
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for n in names:
        pts = [
            (r["round"], r[key][n] if field is None else r[key][n][field])
            for r in rows
            if n in r.get(key, {})
        ]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=n)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], title: str, path: Path) -> None:
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS, fontsize=8)
    for i in range(len(EMOTIONS)):
        for j in range(len(EMOTIONS)):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run: RunFolder) -> Path:
    """Write report.md and the plots into the run folder; returns the report's path."""
    rows = run.read_metrics()
    if not rows:
        raise ValueError(f"{run.path} has no metrics.jsonl rows to report")
    first, last = rows[0], rows[-1]
    plot_series(rows, "lambda", None, "DRO weight per source", "lambda", run.path / "lambda.png")
    plot_series(
        rows,
        "train",
        "uar",
        "Validation UAR per training source",
        "UAR",
        run.path / "train_uar.png",
    )
    plot_series(rows, "heldout", "uar", "Held-out UAR", "UAR", run.path / "heldout_uar.png")
    lines = [f"# Run report: {run.path.name}", "", f"Rounds: {last['round']}", ""]
    lines += [
        "## Training sources (validation split)",
        "",
        "| source | lambda | UAR r0 | UAR | WAR | loss |",
        "|---|---|---|---|---|---|",
    ]
    for n, v in sorted(last["train"].items()):
        u0 = first["train"].get(n, {}).get("uar")
        lines.append(
            f"| {n} | {last['lambda'].get(n, 0):.3f} | {_fmt(u0)} | {_fmt(v['uar'])} "
            f"| {_fmt(v['war'])} | {v['loss']:.3f} |"
        )
    if last["train"]:
        uars = [v["uar"] for v in last["train"].values()]
        lines += ["", f"Mean UAR {_fmt(float(np.mean(uars)))}, worst {_fmt(min(uars))}.", ""]
    if last["heldout"]:
        lines += [
            "## Held-out sources (test split)",
            "",
            "| source | UAR r0 | UAR | WAR |",
            "|---|---|---|---|",
        ]
        for n, v in sorted(last["heldout"].items()):
            u0 = first["heldout"].get(n, {}).get("uar")
            lines.append(f"| {n} | {_fmt(u0)} | {_fmt(v['uar'])} | {_fmt(v['war'])} |")
            if v.get("confusion"):
                png = f"confusion_{n}.png"
                plot_confusion(v["confusion"], f"{n}, round {last['round']}", run.path / png)
                lines.append("")
                lines.append(f"![confusion {n}]({png})")
        lines.append("")
    lines += ["## Plots", "", "![lambda](lambda.png)", "", "![train UAR](train_uar.png)", ""]
    if last["heldout"]:
        lines += ["![held-out UAR](heldout_uar.png)", ""]
    rejected = [r for row in rows for r in row.get("rejected", [])]
    if rejected:
        lines += [
            "## Rejected replies",
            "",
            "| round | kind | node | reason |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['round']} | {r.get('kind', 'train')} | {r['node']} | {r['reason']} |"
            for r in rejected
        ]
        lines.append("")
    flagged = [f for row in rows for f in row.get("flagged", [])]
    if flagged:
        lines += ["## Flagged numbers", "", "| round | node | reason |", "|---|---|---|"]
        lines += [f"| {f['round']} | {f['node']} | {f['reason']} |" for f in flagged]
    path = run.path / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
