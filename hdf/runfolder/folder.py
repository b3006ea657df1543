"""The run folder (docs/design.md §3, Outputs): config, metrics.jsonl, checkpoint, done marker.

The checkpoint is written to a temporary file and renamed, so a crash mid-write leaves the previous
checkpoint intact, and holds everything a resume needs: model, strategy state, round, RNG states.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdf.torchfile import UnreadableFileError, UnsafeFileError, load_torch_file

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
DONE_FILE = "done"
RESUME_FIX = "resume= only a run folder written by simulations.run or the ServerApp"


class RunFolderError(ValueError):
    """A folder given as a run folder (resume=) that is not one, or whose checkpoint is refused."""


class RunFolder:
    """One run's folder; every write is append-only or atomic."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, root: str | os.PathLike[str], name: str) -> RunFolder:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
        path = Path(root) / f"{stamp}-{safe}"
        n = 1
        while path.exists():
            n += 1
            path = Path(root) / f"{stamp}-{safe}-{n}"
        path.mkdir(parents=True)
        return cls(path)

    # ---- config ---------------------------------------------------------------------------
    def write_config(self, yaml_text: str) -> None:
        _atomic_write_bytes(self.path / CONFIG_FILE, yaml_text.encode())

    def read_config(self) -> str:
        f = self.path / CONFIG_FILE
        if not f.exists():
            raise RunFolderError(f"{f} not found: {self.path} is not a run folder; {RESUME_FIX}")
        return f.read_text()

    # ---- metrics ---------------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(clean(row), allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        f = self.path / METRICS_FILE
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows after `last_round` (written by a run that died before its checkpoint)."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        _atomic_write_bytes(self.path / METRICS_FILE, text.encode())

    # ---- checkpoint ------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        tmp = self.path / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path / CHECKPOINT_FILE)

    def load_checkpoint(self) -> dict[str, Any] | None:
        f = self.path / CHECKPOINT_FILE
        if not f.exists():
            return None
        try:
            return load_torch_file(f, RESUME_FIX)
        except (UnsafeFileError, UnreadableFileError) as err:
            raise RunFolderError(str(err)) from None

    @property
    def trained(self) -> bool:
        """Whether at least one round finished (metrics.jsonl has a row with round >= 1)."""
        return any(int(r.get("round", 0)) >= 1 for r in self.read_metrics())

    def mark_done(self) -> None:
        (self.path / DONE_FILE).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

    @property
    def done(self) -> bool:
        return (self.path / DONE_FILE).exists()


@contextmanager
def discarded_unless_trained(run: RunFolder, fresh: bool) -> Iterator[RunFolder]:
    """Remove a `fresh` run folder (created by this command) when the run fails before round 1.

    A run that could not train leaves nothing behind to be mistaken for a result; a resumed
    folder, or one that finished a round, is kept (it can be resumed).
    """
    try:
        yield run
    except Exception:
        if fresh and run.path.is_dir() and not run.trained:
            shutil.rmtree(run.path, ignore_errors=True)
        raise


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states (restored on resume)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def clean(x: Any) -> Any:
    """JSON-ready copy: NaN and Inf become null, numpy values become Python ones."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
