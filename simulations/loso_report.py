"""A leave-one-source-out sweep's report.md and plots, from its runs' metrics and summary.json.

The per-run plots (lambda over rounds, confusion matrices) are the run report's own
(`hdf.runfolder.report`); only the panel of held-out UAR per strategy is the sweep's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from hdf.runfolder.report import pct, plot_confusion, plot_series
from simulations.loso_runs import CENTRALIZED, RunSpec, Sweep
from simulations.loso_summary import BASELINES, METRICS, summarize
from simulations.stats import PairedDiff, verdict


def _first_done(sweep: Sweep, strategy: str) -> RunSpec | None:
    return next((r for r in sweep.runs if r.strategy == strategy and r.done), None)


def plot_heldout_uar(sweep: Sweep, path: Path) -> None:
    """One panel per held-out source: its UAR over rounds, one line per strategy (seed mean)."""
    n = len(sweep.heldout)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    # one distinct colour per strategy (the default cycle repeats after 10)
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(sweep.strategies), 1)))
    for ax, h in zip(axes.flat, sweep.heldout, strict=False):
        for strategy, colour in zip(sweep.strategies, colours, strict=True):
            series: dict[int, list[float]] = {}
            for r in sweep.runs:
                if r.strategy == strategy and r.heldout == h and r.done:
                    for row in r.rows():
                        if h in row.get("heldout", {}):
                            series.setdefault(row["round"], []).append(row["heldout"][h]["uar"])
            if series:
                xs = sorted(series)
                ys = [np.mean(series[x]) for x in xs]
                ax.plot(xs, ys, marker="o", ms=3, color=colour, label=strategy)
        ax.set_title(f"held out: {h}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("UAR")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    # one legend for all panels, beside them, so it hides no line
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


GOAL_POINTS = 3.0  # issue 5: DRO lifts both worst-source UARs by this much over FedAvg ...
GOAL_MEAN_DROP = 1.0  # ... without lowering the held-out mean by more than this


def _strategy_of(entry: str) -> str:
    """The strategy of a sweep entry ("dro@base" -> "dro")."""
    return entry.split("@", 1)[0]


def _fedavg_of(entry: str) -> str:
    """The FedAvg entry an entry is compared with: of the same variant ("dro@base" ->
    "fedavg@base")."""
    _, at, variant = entry.partition("@")
    return f"fedavg{at}{variant}"


def _against_fedavg(summary: dict[str, Any]) -> list[str]:
    """Report lines: each strategy's difference to FedAvg (of its own variant, if any) in UAR
    points, and the goal's verdict."""
    if not any(_strategy_of(k) == "fedavg" for k in summary) or len(summary) < 2:
        return []
    keys = ("worst_heldout_uar", "worst_train_uar", "mean_heldout_uar", "mean_train_uar")
    lines = [
        "",
        "## Against FedAvg (UAR points)",
        "",
        f"Goal: worst held-out and worst in-distribution each +{GOAL_POINTS:g} or more, held-out "
        f"mean down by at most {GOAL_MEAN_DROP:g}.",
        "",
        "| strategy | worst held-out | worst in-distribution | mean held-out | mean "
        "in-distribution | goal met |",
        "|---|---|---|---|---|---|",
    ]
    for strategy, s in summary.items():
        base = summary.get(_fedavg_of(strategy))
        if _strategy_of(strategy) == "fedavg" or base is None:
            continue
        if any(s.get(k) is None or base.get(k) is None for k in keys):
            continue
        d = {k: 100 * (s[k] - base[k]) for k in keys}
        met = (
            d["worst_heldout_uar"] >= GOAL_POINTS
            and d["worst_train_uar"] >= GOAL_POINTS
            and d["mean_heldout_uar"] >= -GOAL_MEAN_DROP
        )
        cells = " | ".join(f"{d[k]:+.1f}" for k in keys)
        lines.append(f"| {strategy} | {cells} | {'yes' if met else 'no'} |")
    return lines


METRIC_LABELS = {
    "heldout_mean": "held-out mean",
    "heldout_worst": "held-out worst",
    "train_mean": "in-distribution mean",
    "train_worst": "in-distribution worst",
}


def _cell(c: dict[str, Any] | None) -> str:
    """One paired difference in UAR points: diff [lo, hi] (n), and what the interval says."""
    if not c:
        return "-"
    p = PairedDiff(**c)
    if p.lo is None or p.hi is None:
        return f"{100 * p.diff:+.1f} (n={p.n}, too few pairs)"
    return f"{100 * p.diff:+.1f} [{100 * p.lo:+.1f}, {100 * p.hi:+.1f}] (n={p.n}) {verdict(p)}"


def _comparison_lines(summary: dict[str, Any], at: str) -> list[str]:
    """Tables of paired differences against FedAvg and the pooled baseline, and the ratios."""

    def entry(s: dict[str, Any]) -> dict[str, Any]:
        return s if at == "last" else s.get(at, {})

    where = WHERE[at]
    lines: list[str] = []
    for key, base in BASELINES.items():
        rows = [(name, entry(s)[key]) for name, s in summary.items() if key in entry(s)]
        if not rows:
            continue
        lines += [
            "",
            f"## Against {base}, {where}: paired difference in UAR points, 95 % CI",
            "",
            "Paired t over (seed, held-out source) pairs (held-out worst: over seeds); the "
            "verdict reads the interval: better / worse when it excludes 0.",
            "",
            "| strategy | " + " | ".join(METRIC_LABELS.values()) + " |",
            "|---" * (len(METRIC_LABELS) + 1) + "|",
        ]
        for name, cmp in rows:
            lines.append(f"| {name} | " + " | ".join(_cell(cmp.get(m)) for m in METRICS) + " |")
    variant_rows = [(name, entry(s)["vs_variant"]) for name, s in summary.items()
                    if "vs_variant" in entry(s)]  # fmt: skip
    if variant_rows:
        lines += [
            "",
            f"## Against the same strategy under the first variant, {where}: UAR points, 95 % CI",
            "",
            "| entry | against | " + " | ".join(METRIC_LABELS.values()) + " |",
            "|---" * (len(METRIC_LABELS) + 2) + "|",
        ]
        for name, cmp in variant_rows:
            cells = " | ".join(_cell(cmp.get(m)) for m in METRICS)
            lines.append(f"| {name} | {cmp['against']} | {cells} |")
    adapted_rows = [(name, method, cmp) for name, s in summary.items()
                    for method, cmp in entry(s).get("adapted_vs_none", {}).items()]  # fmt: skip
    if adapted_rows:
        lines += [
            "",
            f"## Test-time adaptation against none, {where}: held-out UAR points, 95 % CI",
            "",
            "Same runs, same held-out clips, scored after and before adapting on them unlabeled.",
            "",
            "| strategy | adaptation | held-out mean | held-out worst |",
            "|---|---|---|---|",
        ]
        for name, method, cmp in adapted_rows:
            cells = " | ".join(_cell(cmp.get(m)) for m in ("heldout_mean", "heldout_worst"))
            lines.append(f"| {name} | {method} | {cells} |")
    ratios = [
        (name, entry(s)["ratio_to_centralized"])
        for name, s in summary.items()
        if entry(s).get("ratio_to_centralized")
    ]
    if ratios:
        lines += [
            "",
            f"## Federated / centralized, {where}",
            "",
            "| strategy | in-distribution mean | held-out mean |",
            "|---|---|---|",
        ]
        for name, r in ratios:
            cells = ["-" if r[k] is None else f"{r[k]:.2f}" for k in ("train_mean", "heldout_mean")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


WHERE = {
    "last": "last round",
    "selected": "selected round (best.pt)",
    "average": "averaged model (average.pt)",
}


def _last_against(
    summary: dict[str, Any],
    at: str,
    title: str,
    intro: str,
    column: str,
    cell: Callable[[dict[str, Any]], Any],
) -> list[str]:
    """A table of each entry's means at its last round / at `at` ("selected", "average"), with
    one more column (`column`, its cells `cell(summary[entry][at])`)."""
    keys = ("mean_heldout_uar", "worst_heldout_uar", "mean_train_uar", "worst_train_uar")
    lines = [
        "",
        f"## {title}",
        "",
        intro,
        "",
        "| strategy | mean held-out | worst held-out | mean in-distribution | worst "
        f"in-distribution | {column} |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        cells = [f"{pct(s[k])} / {pct(s[at][k])}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cell(s[at])} |")
    return lines


def _average_lines(summary: dict[str, Any]) -> list[str]:
    """The averaged model against the last round's, same runs (`server.average_after`)."""
    averaged = {name: s for name, s in summary.items() if "average" in s}
    if not averaged:
        return []
    lines = _last_against(
        averaged,
        "average",
        "Averaged model (average.pt) and last round",
        "Each run's average of its late rounds' models (`server.average_after`), scored once at "
        "its end; training is the same with or without it. UAR in %, last / average.",
        "runs",
        lambda a: a["runs"],
    )
    lines += [
        "",
        "## Averaged model against the last round, same runs: UAR points, 95 % CI",
        "",
        "| strategy | " + " | ".join(METRIC_LABELS.values()) + " |",
        "|---" * (len(METRIC_LABELS) + 1) + "|",
    ]
    for name, s in averaged.items():
        cmp = s["average"]["vs_last"]
        lines.append(f"| {name} | " + " | ".join(_cell(cmp.get(m)) for m in METRICS) + " |")
    return lines + _comparison_lines(averaged, "average")


def _selected_lines(summary: dict[str, Any]) -> list[str]:
    """Last-round against selected-round (best.pt) means, per strategy."""
    return _last_against(
        summary,
        "selected",
        "Last round and selected round (best.pt)",
        "Each run's selected round has the best worst training-source validation UAR; held-out "
        "sources take no part in the choice. UAR in %, last / selected.",
        "selected rounds",
        lambda sel: ", ".join(str(r) for r in sel["rounds"]),
    )


def _adapted_lines(heldout: list[str], summary: dict[str, Any]) -> list[str]:
    """Report lines: held-out UAR with and without test-time adaptation, per strategy."""
    if not any(s.get("adapted") for s in summary.values()):
        return []
    lines = [
        "",
        "## Held-out sources after test-time adaptation",
        "",
        "Each held-out source scored after adapting the last round's model on its own unlabeled "
        "test clips (`server.heldout_adapt`; `none` is the plain score above). UAR in %, mean ± "
        "std over seeds; the last column is the worst held-out UAR minus that of `none`, in "
        "points.",
        "",
        "| strategy | adaptation | "
        + " | ".join(heldout)
        + " | mean UAR | worst UAR | worst vs none |",
        "|---" * (len(heldout) + 5) + "|",
    ]
    for strategy, s in summary.items():
        if not s.get("adapted"):
            continue
        for method, a in [("none", s), *s["adapted"].items()]:
            cells = [
                "-" if h not in a["heldout"] else
                f"{pct(a['heldout'][h]['uar_mean'])} ± {pct(a['heldout'][h]['uar_std'])}"
                for h in heldout
            ]  # fmt: skip
            gain = 100 * (a["worst_heldout_uar"] - s["worst_heldout_uar"])
            lines.append(
                f"| {strategy} | {method} | " + " | ".join(cells) + f" | "
                f"{pct(a['mean_heldout_uar'])} | {pct(a['worst_heldout_uar'])} | {gain:+.1f} |"
            )
    return lines


def write_report(sweep: Sweep) -> Path:
    """report.md, plots and summary.json in the sweep folder; returns the report's path."""
    summary, details = summarize(sweep)
    (sweep.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    done = sum(r.done for r in sweep.runs)
    lines = [
        f"# Leave-one-source-out report: {sweep.path.name}",
        "",
        f"Overrides: `{' '.join(sweep.base) or '(defaults)'}`; strategies {sweep.strategies}; "
        f"seeds {sweep.seeds}; held-out sources {sweep.heldout}; {done}/{len(sweep.runs)} runs "
        "done."
        + (
            f" Entries {sweep.found} are finished runs of earlier invocations in this folder."
            if sweep.found
            else ""
        ),
        "",
        "Numbers are UAR / WAR in % of the last round's model, mean ± std over seeds. Held-out: "
        "the held-out source's test split. In-distribution: each training source's validation "
        "split; worst = the worst training source of each run, averaged over runs.",
        "",
        "## Held-out sources",
        "",
        "| strategy | " + " | ".join(sweep.heldout) + " | mean UAR | worst UAR |",
        "|---" * (len(sweep.heldout) + 3) + "|",
    ]
    for strategy in sweep.strategies:
        if strategy not in summary:
            lines.append(f"| {strategy} | " + " | ".join("-" for _ in sweep.heldout) + " | - | - |")
            continue
        s = summary[strategy]
        cells = []
        for h in sweep.heldout:
            v = s["heldout"].get(h)
            cells.append(
                "-"
                if v is None
                else f"{pct(v['uar_mean'])} ± {pct(v['uar_std'])} / "
                f"{pct(v['war_mean'])} ± {pct(v['war_std'])}"
            )
        lines.append(
            f"| {strategy} | " + " | ".join(cells) + f" | {pct(s['mean_heldout_uar'])} "
            f"| {pct(s['worst_heldout_uar'])} |"
        )
    sources = sorted({n for d in details.values() for n in d["train_by_source"]})
    lines += [
        "",
        "## In-distribution (validation UAR of training sources)",
        "",
        "| strategy | " + " | ".join(sources) + " | mean | worst | runs | wall time (s) |",
        "|---" * (len(sources) + 5) + "|",
    ]
    for strategy, d in details.items():
        cells = [pct(d["train_by_source"].get(n)) for n in sources]
        lines.append(
            f"| {strategy} | "
            + " | ".join(cells)
            + f" | {pct(summary[strategy]['mean_train_uar'])}"
            f" | {pct(summary[strategy]['worst_train_uar'])} | {d['runs']} | "
            f"{d['wall_seconds']:.0f} |"
        )
    lines += _against_fedavg(summary)
    lines += _comparison_lines(summary, "last")
    lines += _selected_lines(summary)
    lines += _comparison_lines(summary, "selected")
    lines += _average_lines(summary)
    lines += _adapted_lines(sweep.heldout, summary)
    failed = [r for r in sweep.runs if not r.done]
    if failed:
        lines += ["", "## Runs not finished", ""]
        lines += [
            f"- {r.strategy}, held out {r.heldout}, seed {r.seed}: `{r.path}`" for r in failed
        ]
    lines += ["", "## Plots", ""]
    if done:
        plot_heldout_uar(sweep, sweep.path / "heldout_uar.png")
        lines += ["![held-out UAR over rounds](heldout_uar.png)", ""]
    for strategy in sweep.strategies:
        run = _first_done(sweep, strategy)
        no_lambda = (CENTRALIZED, "fedavg", "fedprox", "fedbn", "local", "sequential")
        if run is None or _strategy_of(strategy) in no_lambda:
            continue
        png = f"lambda_{strategy}.png"
        title = f"{run.strategy}: weight per source (held out: {run.heldout}, seed {run.seed})"
        plot_series(run.rows(), "lambda", None, title, "lambda", sweep.path / png)
        lines += [f"![lambda {strategy}]({png})", ""]
    for strategy in sweep.strategies:
        for h in sweep.heldout:
            cms = [
                np.asarray(row["heldout"][h]["confusion"])
                for r in sweep.runs
                if r.strategy == strategy and r.heldout == h and r.done
                for row in r.rows()[-1:]
                if row.get("heldout", {}).get(h, {}).get("confusion") is not None
            ]
            if cms:
                png = f"confusion_{strategy}_{h}.png"
                plot_confusion(
                    np.sum(cms, axis=0).tolist(),
                    f"{strategy}, held out {h} (summed over seeds)",
                    sweep.path / png,
                )
                lines += [f"![confusion {strategy} {h}]({png})", ""]
    path = sweep.path / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
