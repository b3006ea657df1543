"""A run's report.md (tables) and PNG plots, made from its metrics.jsonl alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from hdf.classes import EMOTIONS
from hdf.runfolder.folder import RunFolder
from hdf.runfolder.selection import BEST_MODEL_FILE, CRITERION, score_row, select_round


def _finite(x: Any) -> bool:
    """A number that can be shown and compared (metrics.jsonl stores NaN and Inf as null)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x)


def pct(x: float | None) -> str:
    """A share as a percentage; '-' for a missing or non-finite value."""
    return f"{100 * x:.1f}" if _finite(x) else "-"


def _num(x: float | None, spec: str = ".3f") -> str:
    return format(x, spec) if _finite(x) else "-"


def _worst(by_source: dict[str, dict[str, Any]], key: str = "uar") -> str | None:
    """The source with the lowest finite `key`, or None when no source has one."""
    ok = [n for n, v in by_source.items() if _finite(v.get(key))]
    return min(ok, key=lambda n: by_source[n][key]) if ok else None


def _mean(values: list[Any]) -> float | None:
    ok = [float(v) for v in values if _finite(v)]
    return float(np.mean(ok)) if ok else None


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
            top = max((float(x) for x in lb if _finite(x)), default=None)
            parts.append(f"loss-before mean {_num(_mean(lb))} max {_num(top)}")
    lam = {n: w for n, w in (row.get("lambda") or {}).items() if _finite(w)}
    if lam:
        top_source = max(lam, key=lam.__getitem__)
        parts.append(f"λmax {lam[top_source]:.2f} ({top_source})")
    worst = _worst(train)
    if worst is not None:
        mean = _mean([v.get("uar") for v in train.values()])
        parts.append(f"val UAR mean {_num(mean)} worst {_num(train[worst]['uar'])} ({worst})")
    for name, v in held.items():
        parts.append(f"held-out {name} UAR {_num(v.get('uar'))}")
    parts.append(f"{_num(row.get('seconds'), '.1f')}s")
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
        pts = [(x, y) for x, y in pts if _finite(y)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=n)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
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


def selection_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Report lines: the selected round (best.pt) against the last, held-out scores at both."""
    chosen = select_round(rows)
    if chosen is None:
        return []
    by_round = {r["round"]: r for r in rows}
    last = rows[-1]
    held = sorted(last.get("heldout", {}))
    lines = [
        f"## Model selection ({BEST_MODEL_FILE})",
        "",
        f"{BEST_MODEL_FILE} holds the model of round {chosen.round}, chosen by the {CRITERION}.",
        "",
        "| "
        + " | ".join(
            ["model", "round", "worst training UAR", "mean training UAR"]
            + [f"held-out {n} UAR" for n in held]
        )
        + " |",
        "|---" * (4 + len(held)) + "|",
    ]
    for label, row in (("selected", by_round[chosen.round]), ("last", last)):
        s = score_row(row)
        cells = [
            label,
            str(row["round"]),
            pct(s.worst_train_uar if s else None),
            pct(s.mean_train_uar if s else None),
        ] + [pct(row.get("heldout", {}).get(n, {}).get("uar")) for n in held]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


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
            f"| {n} | {_num(last['lambda'].get(n))} | {pct(u0)} | {pct(v.get('uar'))} "
            f"| {pct(v.get('war'))} | {_num(v.get('loss'))} |"
        )
    worst = _worst(last["train"])
    if worst is not None:
        mean = _mean([v.get("uar") for v in last["train"].values()])
        lines += ["", f"Mean UAR {pct(mean)}, worst {pct(last['train'][worst]['uar'])}.", ""]
    if last["heldout"]:
        lines += [
            "## Held-out sources (test split)",
            "",
            "| source | UAR r0 | UAR | WAR |",
            "|---|---|---|---|",
        ]
        for n, v in sorted(last["heldout"].items()):
            u0 = first["heldout"].get(n, {}).get("uar")
            lines.append(f"| {n} | {pct(u0)} | {pct(v.get('uar'))} | {pct(v.get('war'))} |")
            if v.get("confusion"):
                png = f"confusion_{n}.png"
                plot_confusion(v["confusion"], f"{n}, round {last['round']}", run.path / png)
                lines.append("")
                lines.append(f"![confusion {n}]({png})")
        lines.append("")
    lines += selection_lines(rows)
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
