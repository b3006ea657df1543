"""Freed host memory stays in the process heap for the next training step (glibc only).

A training step allocates and frees the same activation-sized blocks (a few MB each) every step.
glibc serves such blocks with mmap or returns them by trimming the heap top, so every step maps
them again and pays a page fault per 4 KiB page: at tiny3d 8x48x48 on one thread that was ~6,500
minor faults and about a quarter of the base model's step CPU time. Fixed, high mmap and trim
thresholds keep those pages mapped and reused. The arithmetic is untouched (same results); the
process keeps up to one step's peak of host memory between steps, as it held during them.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
_TRIM_THRESHOLD = 2**30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where libc is not glibc.

    Blocks above 32 MiB (glibc's ceiling) are still mapped per allocation; the large models'
    biggest activations are, but their steps are long enough for the faults not to matter.
    """
    global _applied
    if _applied is None:
        _applied = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(None)
            _applied = bool(
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
            )
    return _applied
