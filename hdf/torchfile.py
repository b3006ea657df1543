"""Opening torch files without running their code.

`torch.load(weights_only=False)` unpickles arbitrary objects, so a crafted checkpoint runs any code
it names. Every torch file the project reads (run checkpoints, `model.weights`, cached splits) is
opened here with ``weights_only=True``: tensors, containers and numbers only, plus an explicit
allow-list of the numpy array pieces a run checkpoint holds (RNG states, FedBN/local arrays). A
file that asks for anything else is refused with one line naming the file and the global it wanted.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NP_CORE = getattr(np, "_core", None) or np.core
_NUMERIC = (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64,
)  # fmt: skip
# What a numeric numpy array or scalar needs to be rebuilt (a scalar is its dtype and raw bytes; no
# object arrays: their items would be pickles).
ALLOWED_GLOBALS: list[Any] = [
    _NP_CORE.multiarray._reconstruct,
    _NP_CORE.multiarray.scalar,
    np.ndarray,
    np.dtype,
    *(type(np.dtype(t)) for t in _NUMERIC),
]


# torch's weights-only unpickler says this of an object type outside the allow-list
_REFUSED = "Can only build"


class UnsafeFileError(ValueError):
    """A torch file that would run code (or build objects outside the allow-list) when opened."""


class UnreadableFileError(ValueError):
    """A file that is not a torch file, or is truncated or corrupt."""


def _wanted_globals(path: Path) -> list[str]:
    """The globals outside torch's safe set that the file's pickle names (read, never called)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an old-format or odd file: the refusal still stands, just less specific
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    return [n for n in names if n not in allowed]


def load_torch_file(path: str | os.PathLike[str], fix: str) -> Any:
    """The object stored in `path`, on the CPU, loaded without executing code.

    `fix` ends the error messages: what the user should give instead (it names their command's
    own file kind, e.g. "give a run folder written by simulations.run").
    """
    f = Path(path)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        named = re.findall(r"GLOBAL (\S+)", text)
        wanted = _wanted_globals(f) or named
        if wanted or _REFUSED in text:
            what = f"it names {', '.join(wanted)}" if wanted else "it builds objects, not data"
            raise UnsafeFileError(
                f"{f}: refused to open: {what}, which loading would call (a pickle can run "
                f"code) and a file written by this project never holds; {fix}"
            ) from None
        raise UnreadableFileError(
            f"{f}: not a readable torch file ({_short(err)}); {fix}"
        ) from None
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise UnreadableFileError(
            f"{f}: not a readable torch file ({_short(err)}); {fix}"
        ) from None


def _short(err: BaseException) -> str:
    """What went wrong, on one line: the weights-only unpickler's own reason when there is one."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    return " ".join(text.split())[:200] or type(err).__name__
