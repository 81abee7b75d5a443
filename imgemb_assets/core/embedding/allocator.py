"""glibc malloc tuning for CPU inference, applied in-process (never through LD_PRELOAD).

Why: a CPU forward pass of ResNet50 at batch 64 allocates and frees gigabytes
of activation buffers (the largest ~200 MB each). glibc serves every buffer
above its mmap threshold (at most 32 MiB) with a fresh `mmap` and gives it back
with `munmap` on free, so each forward pass faults all of them in again page by
page: about 1.2 million minor page faults per 64 images, a large share of the
time. Keeping those allocations on the heap (`M_MMAP_MAX=0`) and never trimming
the heap (`M_TRIM_THRESHOLD` huge) lets the next pass reuse pages already mapped.

The cost: the process keeps its peak heap until it exits instead of returning
it to the OS. The embedding step runs in its own short-lived process, so that
is the right trade there; the setting is process-wide and cannot be undone
safely, which is why it is applied only when a CPU model is built with a
runtime that asks for it, never at import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import threading
from typing import Final

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_MAX: Final = -4
# mallopt takes a C int: INT_MAX (2 GiB) is the largest threshold it accepts, so
# the top of the heap is trimmed only when more than 2 GiB of it is free.
_NO_TRIM: Final = 2**31 - 1

_lock = threading.Lock()
_applied: bool | None = None  # None: not tried yet


def keep_inference_memory_mapped() -> bool:
    """Tunes glibc malloc so freed activation buffers stay mapped; whether it is in effect.

    Idempotent and thread-safe. Does nothing (returns False) where the C
    library is not glibc, e.g. musl or macOS, or when glibc refuses a setting.
    """
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply_mallopt()
        return _applied


def malloc_tuning_applied() -> bool:
    """Whether this process has had its malloc tuned (for reports and tests)."""
    return bool(_applied)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's glibc, loaded once (`find_library` runs `ldconfig`), or None under another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _apply_mallopt() -> bool:
    libc = _glibc()
    if libc is None:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. Trim first: if mmap were disabled while the
    # heap could still be trimmed, freed buffers would be unmapped all the same.
    return bool(mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)) and bool(mallopt(_M_MMAP_MAX, 0))


class _MallInfo2(ctypes.Structure):
    # glibc >= 2.33 <malloc.h>: struct mallinfo2, every field a size_t.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


# Free heap kept for the next partition's batches: releasing less than this costs
# more in page faults (each partition faulting its activations in again) than it saves.
# A run of 7 prefixes at batch 16 ends with 0.4-0.8 GiB free: trimming past 512 MiB
# cost 5% of the forward passes' speed there (21.2 vs 22.5 images/s).
DEFAULT_KEPT_FREE_BYTES: Final = 1024 * 2**20


def free_heap_bytes() -> int | None:
    """Bytes the heap holds free (glibc `mallinfo2().fordblks`), or None where it cannot be read."""
    libc = _glibc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def release_free_heap(kept_free_bytes: int = DEFAULT_KEPT_FREE_BYTES) -> bool:
    """Gives the heap's free pages back to the OS (glibc `malloc_trim`) once more than `kept_free_bytes`
    are free; whether it did.

    With the tuning above nothing is ever returned on its own, so a long step
    grows as batches of other sizes leave free holes behind. Called between
    partitions, it bounds the step's memory near one partition's peak. Below
    the threshold the pages stay, so the next partition's activations do not
    fault in again.
    """
    if not _applied:
        return False
    free = free_heap_bytes()
    if free is not None and free < kept_free_bytes:
        return False
    libc = _glibc()
    assert libc is not None  # the tuning was applied, so this is glibc
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return bool(libc.malloc_trim(0))
