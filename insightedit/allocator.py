"""glibc malloc padding that keeps freed tensor memory in the process instead of returning it page by page.

On Linux, torch's CPU allocator is glibc's ``malloc``. With glibc's defaults the heap is grown by exactly
what is asked and shrunk as soon as its free top passes the (dynamic) trim threshold, so a training step
that allocates and frees the same activations every iteration gives the pages back to the kernel and
faults them in again, zero-filled, on the next step. On the README's main job that was 14.9 million minor
page faults and 16.4 s of system time in 120 steps, 2.45 steps/s; with a 256 MiB top pad the heap keeps
that much slack when it grows and when it trims: 0.4 million faults, 1.2 s of system time, 3.49 steps/s
(1.42x on idle cores; 64 MiB gave 1.13x; the same losses; peak RSS 1.41 GiB instead of 1.25;
``benchmarks/results/malloc_pad.md``). Beside a busy process the gain is not reliable: 1.42x in one run
(at 0da87ce) and 1.04x, with 12.0 million faults, in the next (at d5b8659); we have not found why.

:func:`pad_heap` sets it with ``mallopt(M_TOP_PAD)`` at run time, which glibc honours for every later
allocation, and fixes the mmap threshold at 32 MiB (any ``mallopt`` freezes glibc's dynamic threshold
where it stands, 128 KiB in a fresh process). Call it **after torch is imported**: called before, the
same settings left the CLIP foundation's training at 10.2 million faults per 150 steps (4.5 steps/s)
against 1.8 million (6.0 steps/s) after — measured, not explained. It does nothing where the C library
is not glibc, and nothing when ``MALLOC_TOP_PAD_`` is in the environment: glibc has then already applied
the user's value (``MALLOC_TOP_PAD_=0`` turns the padding off). The ``insightedit`` command's Lightning
subcommands call it once torch has loaded; so do the test suite's conftest and ``benchmarks/zoo.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

TOP_PAD_VARIABLE = "MALLOC_TOP_PAD_"
DEFAULT_TOP_PAD = 256 * 2**20  # bytes; measured against 64 MiB and glibc's own (benchmarks/results/malloc_pad.md)
MMAP_THRESHOLD = 32 * 2**20  # bytes: glibc's largest dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3  # <malloc.h>


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or ``None`` on another platform or C library (musl has no ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu_get_libc_version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return libc


def pad_heap(top_pad: int = DEFAULT_TOP_PAD, environ: Mapping[str, str] | None = None) -> bool:
    """Make glibc keep ``top_pad`` bytes of slack at the top of the heap; return whether it was set.

    Returns ``False`` (and changes nothing) when ``MALLOC_TOP_PAD_`` is set in ``environ`` (default
    ``os.environ``), when the C library is not glibc, or when ``mallopt`` refuses the value.
    """
    if TOP_PAD_VARIABLE in (os.environ if environ is None else environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # Setting any of these freezes glibc's dynamic mmap threshold where it stands: 128 KiB in a fresh
    # process, so every larger block would be mmap'ed and faulted in at each use. Fix it where the dynamic
    # threshold would have climbed to, so that blocks up to 32 MiB come from the padded heap.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TOP_PAD, int(top_pad)))
