"""Host memory that training frees goes back to the system at once (glibc's malloc: a fixed mmap threshold).

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB to start) with its own memory
mapping, which ``free`` unmaps. But after the first such block is freed, glibc raises the threshold to its
size (up to 32 MiB), so from then on most parameter-sized tensors (a UNet's gradients, AdamW's states,
activations) come from the heap, and freeing them leaves holes the process keeps: its resident set stays
at the high-water mark. Measured at full width on a CPU (``benchmarks/results/full_width.md``): stage 3's
``zero_grad`` then returns 1 of its 2.6 GiB of gradients, and the run peaks about 1 GiB higher than with the
threshold fixed. Setting the threshold explicitly (``mallopt(M_MMAP_THRESHOLD, ...)``, as the
``MALLOC_MMAP_THRESHOLD_`` environment variable does) turns the raising off; the values computed do not change.

That serves a large model and costs a small one: the tiny twin's activations (128 KiB to a few MiB) are
freed and allocated again every step, and each one mapped anew is faulted in again, zero-filled. The
README's main job with the 128 KiB threshold took 30.7 million minor faults and 32 s of system time in
300 steps (2.6 steps/s, 2 min 4 s); with blocks up to 32 MiB served from the padded heap
(:func:`insightedit.allocator.pad_heap`), 0.31 million and 1.3 s (3.6 steps/s, 1 min 34 s; peak RSS 1.41
GiB against 1.27; the same losses). So the commands fix the 128 KiB threshold before the model is
built (a large model's weights load under it), and :func:`suit_heap_to_model` switches a model with
fewer than :data:`SMALL_MODEL_BYTES` of parameters to the padded heap once it is built.
"""

from __future__ import annotations

import ctypes
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 128 * 1024  # glibc's starting value
SMALL_MODEL_BYTES = 256 * 2**20  # the tiny twin: ~20 MB; full-width members (fewer layers too): GBs


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


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters (each once; meta-device parameters count at their dtype's size)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def suit_heap_to_model(model: torch.nn.Module, limit: int = SMALL_MODEL_BYTES) -> bool:
    """For a model under ``limit`` bytes of parameters, serve blocks up to 32 MiB from the padded heap.

    Calls :func:`insightedit.allocator.pad_heap` (which leaves a user's ``MALLOC_TOP_PAD_`` alone); a larger
    model keeps the 128 KiB threshold of :func:`return_freed_memory`. Returns whether it switched.
    """
    from insightedit.allocator import pad_heap

    return parameter_bytes(model) < limit and pad_heap()


__all__ = ["SMALL_MODEL_BYTES", "parameter_bytes", "return_freed_memory", "suit_heap_to_model"]
