"""What a leave-one-source-out sweep holds: its folder and runs, and the files a run leaves.

Written by the sweep (`simulations.loso`), read by its summary (`simulations.loso_summary`) and
report (`simulations.loso_report`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hdf.runfolder.folder import DONE_FILE, RunFolder

CENTRALIZED = "centralized"  # the pooled baseline's entry (`simulations.centralized`)
RUN_INFO = "loso.json"  # per run: entry, held-out source, seed, overrides, wall s, exit code, code
LOG_FILE = "log.txt"  # per run: the child process's output


@dataclass
class RunSpec:
    """One federation of the sweep."""

    strategy: str  # the sweep entry: a strategy file name, or "strategy@variant"
    heldout: str
    seed: int
    overrides: list[str]
    path: Path
    conf: str = ""  # the strategy file (or "centralized") when `strategy` names a variant

    @property
    def strategy_conf(self) -> str:
        return self.conf or self.strategy

    @property
    def done(self) -> bool:
        return (self.path / DONE_FILE).exists()

    def rows(self) -> list[dict[str, Any]]:
        """The run's metrics.jsonl rows (none before its first round)."""
        return RunFolder(self.path).read_metrics()


@dataclass
class Sweep:
    path: Path
    base: list[str]
    strategies: list[str]
    seeds: list[int]
    heldout: list[str]
    runs: list[RunSpec] = field(default_factory=list)
    jobs: int = 1
    variants: list[str] = field(default_factory=list)  # names, in the order given
    # entries read from the folder, run by other invocations with other loso settings
    found: list[str] = field(default_factory=list)

    def with_found_entries(self) -> Sweep:
        """This sweep plus the finished runs of other entries in its folder (same overrides,
        so the same data, model and budget; another invocation ran them, e.g. the pooled
        baseline under its own variant), for this sweep's held-out sources and seeds: the
        summary then compares this sweep's entries with them."""
        planned = set(self.strategies)
        found: list[RunSpec] = []
        for info in sorted((self.path / "runs").glob(f"*/{RUN_INFO}")):
            try:
                d = json.loads(info.read_text())
                spec = RunSpec(
                    str(d["strategy"]), str(d["heldout"]), int(d["seed"]), [], info.parent
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a run this sweep can read; its own invocation reports it
            usable = spec.heldout in self.heldout and spec.seed in self.seeds and spec.done
            if spec.strategy not in planned and usable:
                found.append(spec)
        names = sorted({r.strategy for r in found})
        return replace(
            self, strategies=[*self.strategies, *names], runs=[*self.runs, *found], found=names
        )
