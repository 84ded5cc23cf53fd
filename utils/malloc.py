"""Keep freed memory inside the process on glibc, so that large tensors do not page-fault anew.

glibc serves blocks above its mmap threshold with fresh ``mmap`` calls and trims the heap when
its top grows free; a training step frees and re-allocates the same multi-megabyte activations
and weight casts every iteration, and each fresh page costs a page fault (measured: 5 % of a
ResNet-101 CPU step).  PyTorch's CPU tuning guide recommends jemalloc / tcmalloc for this; the
same effect is available from glibc itself through ``mallopt``, with no extra package.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems (4 MiB * sizeof(long))


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold to its maximum and stop heap trimming; True if applied.

    A no-op (False) on other platforms and C libraries.  The price is that the resident size
    stays at its peak instead of shrinking between iterations.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 256 * 2**20)))
