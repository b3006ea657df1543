"""The numbers of a leave-one-source-out sweep (summary.json): per entry, held-out and
in-distribution UARs at the last and at the selected round (and of the runs' averaged model, when
they have one: `server.average_after`), and paired differences with 95 % intervals against
FedAvg, the pooled baseline, the first variant and no adaptation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from hdf.runfolder.averaging import read_average
from hdf.runfolder.selection import select_round
from simulations.loso_runs import CENTRALIZED, RUN_INFO, RunSpec, Sweep
from simulations.stats import paired_ci


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs))  # population std: 0 with one seed


# which model of a run is scored: its last round's, its best.pt round's, or its average.pt
AT = ("last", "selected", "average")
METRICS = ("heldout_mean", "heldout_worst", "train_mean", "train_worst")
BASELINES = {"vs_fedavg": "fedavg", "vs_centralized": CENTRALIZED}
Values = dict[tuple[int, str], dict[str, Any]]  # (seed, held-out source) -> one run's numbers


def _pick(run: RunSpec, at: str) -> dict[str, Any] | None:
    """The row scored for a run: its last, its selected round (training sources only), or its
    averaged model's (None when the run has none)."""
    if at == "average":
        return read_average(run.path)
    rows = run.rows()
    if not rows:
        return None
    if at == "last":
        return rows[-1]
    chosen = select_round(rows)
    return next((r for r in rows if r["round"] == chosen.round), None) if chosen else rows[-1]


def run_values(sweep: Sweep, strategy: str, at: str) -> Values:
    """Per finished run of `strategy`: held-out UAR and WAR, training-source UARs, round."""
    out: Values = {}
    for r in sweep.runs:
        if r.strategy != strategy or not r.done:
            continue
        row = _pick(r, at)
        if row is None:
            continue
        v: dict[str, Any] = {"round": row["round"]}
        held = row.get("heldout", {}).get(r.heldout)
        if held is not None:
            v["heldout"], v["heldout_war"] = held["uar"], held["war"]
        adapted = {
            method: by_source[r.heldout]["uar"]
            for method, by_source in row.get("heldout_adapted", {}).items()
            if r.heldout in by_source
        }
        if adapted:
            v["adapted"] = adapted
        train = {n: x["uar"] for n, x in row.get("train", {}).items()}
        if train:
            v["train_by_source"] = train
            v["train_mean"] = float(np.mean(list(train.values())))
            v["train_worst"] = float(min(train.values()))
        out[(r.seed, r.heldout)] = v
    return out


def aggregate(values: Values, heldout: list[str]) -> dict[str, float | None]:
    """mean/worst held-out UAR (over held-out sources of their seed means) and mean/worst
    training-source UAR (averaged over runs) of one strategy's runs."""
    by_source = {
        h: [v["heldout"] for (_, hh), v in values.items() if hh == h and "heldout" in v]
        for h in heldout
    }
    means = [float(np.mean(x)) for x in by_source.values() if x]
    train = [v for v in values.values() if "train_mean" in v]
    return {
        "mean_heldout_uar": float(np.mean(means)) if means else None,
        "worst_heldout_uar": float(np.min(means)) if means else None,
        "worst_train_uar": float(np.mean([v["train_worst"] for v in train])) if train else None,
        "mean_train_uar": float(np.mean([v["train_mean"] for v in train])) if train else None,
    }


def paired(a: Values, b: Values, metric: str, heldout: list[str]) -> tuple[list[float], ...]:
    """The paired samples of `metric` for strategies a and b (pairs both have).

    Per (seed, held-out source) run: heldout_mean is its held-out UAR, train_mean / train_worst
    its training sources' mean / worst validation UAR. heldout_worst pairs per seed: the worst
    held-out source of that seed (only seeds with every held-out source done in both), so its
    n is the number of seeds.
    """
    if metric == "heldout_worst":
        xs, ys = [], []
        for seed in sorted({k[0] for k in a}):
            keys = [(seed, h) for h in heldout]
            if all("heldout" in a.get(k, {}) and "heldout" in b.get(k, {}) for k in keys):
                xs.append(min(a[k]["heldout"] for k in keys))
                ys.append(min(b[k]["heldout"] for k in keys))
        return xs, ys
    field_ = "heldout" if metric == "heldout_mean" else metric
    keys = sorted(k for k in a if field_ in a[k] and field_ in b.get(k, {}))
    return [a[k][field_] for k in keys], [b[k][field_] for k in keys]


def baseline_of(entry: str, base: str, entries: Iterable[str]) -> str | None:
    """The entry `entry` is compared with for `base` ("fedavg", "centralized"): the base of the
    same variant ("dro@base" -> "fedavg@base") where the sweep has it, else the plain base,
    else the sweep's only entry of the base strategy ("centralized@p2", the pooled model at its
    own schedule)."""
    _, at, variant = entry.partition("@")
    names = set(entries)
    only = [n for n in names if n.partition("@")[0] == base]
    for candidate in (f"{base}{at}{variant}", base, *(only if len(only) == 1 else [])):
        if candidate in names:
            return None if candidate == entry else candidate
    return None


def variant_reference(entry: str, variants: list[str]) -> str | None:
    """The same strategy under the sweep's first variant ("dro@base" -> "dro@hdf" when the
    variants are [hdf, base]): what a variant is measured against; None for the first itself."""
    strategy, at, variant = entry.partition("@")
    if not at or not variants or variant == variants[0]:
        return None
    return f"{strategy}@{variants[0]}"


def _compare(mine: Values, other: Values, heldout: list[str]) -> dict[str, Any]:
    """{metric: {diff, lo, hi, n}} of `mine` minus `other` over the pairs both have."""
    out = {}
    for metric in METRICS:
        xs, ys = paired(mine, other, metric, heldout)
        if xs:
            out[metric] = paired_ci(xs, ys).as_dict()
    return out


def comparisons(
    values: dict[str, Values], heldout: list[str], variants: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per entry: `vs_fedavg` / `vs_centralized` {metric: {diff, lo, hi, n}} (paired t), against
    the baseline of the same variant; with variants, `vs_variant` against the same strategy under
    the first variant (`against` names it); `adapted_vs_none` {method: {heldout_mean,
    heldout_worst}}: held-out UAR after test-time adaptation minus without, same runs."""
    out: dict[str, dict[str, Any]] = {}
    for entry, mine in values.items():
        out[entry] = {}
        for key, base in BASELINES.items():
            other = baseline_of(entry, base, values)
            cmp = _compare(mine, values[other], heldout) if other is not None else {}
            if cmp:  # no pairs (e.g. the baseline has no averaged models): no entry
                out[entry][key] = cmp
        ref = variant_reference(entry, variants or [])
        if ref in values:
            out[entry]["vs_variant"] = {"against": ref, **_compare(mine, values[ref], heldout)}
        methods = sorted({m for v in mine.values() for m in v.get("adapted", {})} - {"none"})
        adapted = {}
        for method in methods:
            moved = {
                k: {**v, "heldout": v["adapted"][method]}
                for k, v in mine.items()
                if method in v.get("adapted", {})
            }
            cmp = _compare(moved, mine, heldout)
            adapted[method] = {m: cmp[m] for m in ("heldout_mean", "heldout_worst") if m in cmp}
        if adapted:
            out[entry]["adapted_vs_none"] = adapted
    return out


def ratio_to_centralized(
    mine: dict[str, Any], central: dict[str, Any] | None
) -> dict[str, float | None] | None:
    """Federated / pooled for in-distribution mean and held-out mean UAR."""
    if central is None:
        return None

    def ratio(key: str) -> float | None:
        x, y = mine.get(key), central.get(key)
        return None if x is None or not y else float(x) / float(y)

    return {"train_mean": ratio("mean_train_uar"), "heldout_mean": ratio("mean_heldout_uar")}


def summarize(sweep: Sweep) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary.json content, details for the report) from the finished runs.

    Per strategy and held-out source: UAR and WAR of the last round's global model on the source's
    test split, mean and (population) std over seeds. mean_heldout_uar / worst_heldout_uar: mean
    and min over held-out sources of those means. worst_train_uar / mean_train_uar: the worst
    training source's validation UAR / the training sources' mean validation UAR in each run's
    last round, averaged over that strategy's runs. vs_fedavg / vs_centralized: paired
    differences with 95 % paired-t intervals (`comparisons`); ratio_to_centralized: this
    strategy's over the pooled baseline's mean UARs. `selected`: the same numbers at each run's
    selected round (best.pt: the best worst training-source validation UAR), plus its rounds.
    `average` (runs with `server.average_after`): the same numbers for each run's averaged model
    (average.pt), its comparisons against the baselines' averaged models, and `vs_last`: average
    minus last round within the same runs.
    """
    summary: dict[str, Any] = {}
    details: dict[str, Any] = {}
    values = {at: {s: run_values(sweep, s, at) for s in sweep.strategies} for at in AT}
    for strategy in sweep.strategies:
        runs = [r for r in sweep.runs if r.strategy == strategy and r.done]
        last = values["last"][strategy]
        held: dict[str, Any] = {}
        for h in sweep.heldout:
            xs = [v for (_, hh), v in last.items() if hh == h and "heldout" in v]
            if not xs:
                continue
            um, us = _mean_std([x["heldout"] for x in xs])
            wm, ws = _mean_std([x["heldout_war"] for x in xs])
            held[h] = {"uar_mean": um, "uar_std": us, "war_mean": wm, "war_std": ws}
        if not held:
            continue
        summary[strategy] = {"heldout": held, **aggregate(last, sweep.heldout)}
        selected = values["selected"][strategy]
        summary[strategy]["selected"] = {
            **aggregate(selected, sweep.heldout),
            "rounds": sorted(v["round"] for v in selected.values()),
        }
        average = values["average"][strategy]
        if average:
            summary[strategy]["average"] = {
                **aggregate(average, sweep.heldout),
                "runs": len(average),
                "vs_last": _compare(average, last, sweep.heldout),
            }
        train_by_source: dict[str, list[float]] = {}
        for v in last.values():
            for name, u in v.get("train_by_source", {}).items():
                train_by_source.setdefault(name, []).append(u)
        seconds = [
            float(json.loads((r.path / RUN_INFO).read_text()).get("wall_s", 0.0))
            for r in runs
            if (r.path / RUN_INFO).exists()
        ]
        adapted = summarize_adapted(runs)
        if adapted:
            summary[strategy]["adapted"] = adapted
        details[strategy] = {
            "runs": len(runs),
            "train_by_source": {k: float(np.mean(v)) for k, v in train_by_source.items()},
            "wall_seconds": float(np.sum(seconds)),
        }
    for at in AT:
        cmp = comparisons({s: values[at][s] for s in summary}, sweep.heldout, sweep.variants)
        for strategy, entry in summary.items():
            target = entry if at == "last" else entry.get(at)
            if target is None:
                continue
            target.update(cmp.get(strategy, {}))
            other = baseline_of(strategy, CENTRALIZED, summary)
            central = summary.get(other) if other else None
            central = central if central is None or at == "last" else central.get(at)
            if central is not None:
                target["ratio_to_centralized"] = ratio_to_centralized(target, central)
    return summary, details


def summarize_adapted(runs: list[RunSpec]) -> dict[str, Any]:
    """{method: {"heldout": {source: {uar_mean, uar_std, war_mean, war_std}}, mean_heldout_uar,
    worst_heldout_uar}}: the held-out scores after test-time adaptation (`heldout_adapted` of
    each run's last row, `server.heldout_adapt`), aggregated as the plain ones are."""
    scores: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in runs:
        rows = r.rows()
        for method, by_source in (rows[-1].get("heldout_adapted", {}) if rows else {}).items():
            if r.heldout in by_source:
                v = by_source[r.heldout]
                scores.setdefault(method, {}).setdefault(r.heldout, []).append((v["uar"], v["war"]))
    out: dict[str, Any] = {}
    for method, by_source in scores.items():
        held = {}
        for h, pairs in by_source.items():
            um, us = _mean_std([u for u, _ in pairs])
            wm, ws = _mean_std([w for _, w in pairs])
            held[h] = {"uar_mean": um, "uar_std": us, "war_mean": wm, "war_std": ws}
        means = [v["uar_mean"] for v in held.values()]
        out[method] = {
            "heldout": held,
            "mean_heldout_uar": float(np.mean(means)),
            "worst_heldout_uar": float(np.min(means)),
        }
    return out
