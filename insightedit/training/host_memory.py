"""Host memory that training frees goes back to the system at once (glibc's malloc: a fixed mmap threshold).

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB to start) with its own memory
mapping, which ``free`` unmaps. But after the first such block is freed, glibc raises the threshold to its
size (up to 32 MiB), so from then on most parameter-sized tensors (a UNet's gradients, AdamW's states,
activations) come from the heap, and freeing them leaves holes the process keeps: its resident set stays
at the high-water mark. Measured at full width on a CPU (``benchmarks/results/full_width.md``): stage 3's
``zero_grad`` then returns 1 of its 2.6 GiB of gradients, and the run peaks about 1 GiB higher than with the
threshold fixed. Setting the threshold explicitly (``mallopt(M_MMAP_THRESHOLD, ...)``, as the
``MALLOC_MMAP_THRESHOLD_`` environment variable does) turns the raising off; the values computed do not change.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 128 * 1024  # glibc's starting value


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; whether it was set (``False`` off glibc/Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


__all__ = ["return_freed_memory"]
