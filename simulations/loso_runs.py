"""What a leave-one-source-out sweep holds: its folder and runs, and the files a run leaves.

Written by the sweep (`simulations.loso`), read by its summary (`simulations.loso_summary`) and
report (`simulations.loso_report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
