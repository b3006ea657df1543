"""On-disk cache of generated splits, keyed by a hash of every parameter and the generator version.

Files are written to a temporary name and renamed, so concurrent clients (simulation actors that
start together) never read a half-written file; whichever finishes last wins with identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def cache_key(params: dict[str, Any]) -> str:
    """Hex digest of `params` (plain data) in a canonical JSON form."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load(path: Path) -> tuple[torch.Tensor, np.ndarray] | None:
    """(clips, labels) from `path`, or None when it is missing or unreadable (then regenerate)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data["clips"], data["labels"].numpy().astype(np.int64)
    except Exception:  # a truncated or foreign file is regenerated, never trusted
        return None


def save(path: Path, clips: torch.Tensor, labels: np.ndarray, meta: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        payload = {"clips": clips.contiguous(), "labels": torch.from_numpy(labels), "meta": meta}
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
