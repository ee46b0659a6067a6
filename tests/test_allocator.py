"""glibc heap padding (insightedit/allocator.py): the heap really grows by the pad, and a user's setting wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from insightedit import allocator

GLIBC = allocator._glibc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc only (mallopt, mallinfo2)")

# In a fresh interpreter: optionally pad_heap(), then malloc 64 KiB blocks until the main arena grows and print by
# how many bytes it grew (mallinfo2().arena: the bytes the main arena has taken from the kernel with sbrk).
GROWTH = """
import ctypes, sys
from insightedit.allocator import pad_heap
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
applied = pad_heap() if sys.argv[1] == "pad" else None
before = libc.mallinfo2().arena
for _ in range(100_000):
    libc.malloc(64 * 1024)
    if libc.mallinfo2().arena != before:
        break
print(applied, libc.mallinfo2().arena - before)
"""


def _growth(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k != allocator.TOP_PAD_VARIABLE}
    out = subprocess.run(
        [sys.executable, "-c", GROWTH, mode], env={**environ, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@needs_glibc
def test_pad_heap_makes_the_heap_grow_by_the_pad() -> None:
    applied, padded = _growth("pad")
    _, plain = _growth("plain")
    assert applied == "True"
    assert allocator.DEFAULT_TOP_PAD <= padded < allocator.DEFAULT_TOP_PAD + 2**20
    assert plain < 2**20  # glibc's own growth: about what was asked


@needs_glibc
def test_a_top_pad_the_user_set_is_left_alone() -> None:
    applied, growth = _growth("pad", MALLOC_TOP_PAD_=str(2**20))
    assert applied == "False"
    assert 2**20 <= growth < 2 * 2**20  # the user's 1 MiB, applied by glibc itself


def test_pad_heap_does_nothing_when_the_variable_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("libc must not be touched"))
    assert allocator.pad_heap(environ={"MALLOC_TOP_PAD_": "0"}) is False


def test_pad_heap_does_nothing_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.pad_heap(environ={}) is False
