"""How every command line reports to people: one-line errors with exit status 2, unwrapped output.

Each `python -m simulations.<command>` decorates its `main` with `@command`. An error a person
can fix (a bad override or config value, a missing, unreadable or refused file, data a run cannot
train on) prints ``error: <message>`` as one line on stderr and returns 2, with no traceback;
``HDF_DEBUG=1`` raises it instead, traceback included. Any other exception is a bug and raises.
`console` is the one way a command makes a rich Console: it never hard-wraps printed text, so
paths and phrases survive pipes, logs and CI whatever the terminal width.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from hdf.data.faces import FaceDetectorUnavailable
from hdf.data.frames import ClipReadError
from hdf.export import ExportError
from hdf.models.weights import WeightsError

EXIT_USER_ERROR = 2
DEBUG_ENV = "HDF_DEBUG"
TABLE_WIDTH = 160  # columns a table may use when output is not a terminal (rich would use 80)

# Config and data errors: ValueError covers the project's own checks (CheckpointError,
# RunFolderError, UnsafeFileError, Source splits, ...); the rest are the libraries' and ours
# that do not derive from it.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    HydraException,
    OmegaConfBaseException,
    ClipReadError,
    FaceDetectorUnavailable,
    WeightsError,
    ExportError,
)

Main = TypeVar("Main", bound=Callable[..., int])


def one_line(err: BaseException | str) -> str:
    """The message on one line: newlines and runs of spaces (Hydra's multi-line errors) folded."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def print_error(err: BaseException | str) -> None:
    """``error: <message>`` as one line on stderr."""
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def command(main: Main) -> Main:
    """`main(argv)` returning its exit status, with user errors turned into one line and 2."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None, *args: object, **kwargs: object) -> int:
        try:
            return int(main(argv, *args, **kwargs) or 0)
        except USER_ERRORS as err:
            if debug():
                raise
            print_error(err)
            return EXIT_USER_ERROR

    return wrapped  # type: ignore[return-value]


def console(*, stderr: bool = False) -> Console:
    """A Console that never hard-wraps text; tables get `TABLE_WIDTH` columns off a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else TABLE_WIDTH
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)
