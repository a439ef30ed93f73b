"""Keep freed CPU memory in the process, so a training step does not page-fault its activations back in.

PyTorch allocates CPU tensors with the C library's malloc. glibc hands large freed blocks back to the kernel:
blocks above its mmap threshold are unmapped when freed, and free memory at the top of the heap above the trim
threshold is released. A training step allocates and frees the same activations every step (at the tokenizer
benchmark's batch, tens of 2–8 MiB tensors), so each step touches fresh pages again and the kernel zero-fills
them on first touch: about 22,800 minor page faults per step in `benchmarks/tokenizer_speed.py`, an 8 MiB
activation costing some 5 ms of faults against 0.5 ms of arithmetic (`--malloc` there compares both settings).

`retain_freed_memory` sets glibc's mmap threshold to its largest value (32 MiB) and turns trimming off, so
freed blocks stay in the heap and the next step reuses them: what a caching allocator does on a GPU. The
process's resident memory then stays near its peak instead of shrinking between steps. Tensors above 32 MiB
still come from mmap. It is a process-wide setting, so it is never made at import: every `vqim` command calls it
at start, the trainers when they train on the CPU, and a program that embeds vqim may call it itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""glibc's upper limit on M_MMAP_THRESHOLD on 64-bit systems (4 MiB × sizeof(long))."""
_TRIM_OFF = 2**31 - 1  # mallopt takes an int: the largest one, i.e. never trim

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has mallopt and gnu_get_libc_version), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl and others
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Make glibc keep freed heap memory for reuse (module docstring); idempotent.

    Skipped when the environment variable VQIM_RETAIN_FREED_MEMORY is "0", or when the C library is not glibc
    (macOS, musl, Windows), where it has nothing to set.

    Returns:
        whether the setting is in force in this process.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("VQIM_RETAIN_FREED_MEMORY", "1") == "0":
        _applied = False
        return False
    libc = _glibc()
    if libc is None:
        _applied = False
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_OFF)
    )
    if not ok:
        log.warning("mallopt refused the memory-retention settings; freed memory goes back to the kernel")
    _applied = ok
    return ok
