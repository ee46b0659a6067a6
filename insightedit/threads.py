"""CPU thread settings that hold up when other jobs share the cores.

torch's CPU kernels run on GNU OpenMP (libgomp, bundled with the torch wheel; MKL uses it too). With no
``OMP_WAIT_POLICY`` set, libgomp lets a waiting thread spin for about 300,000 iterations (milliseconds)
before it sleeps, and it throttles the spin only when *its own* threads outnumber the cores: it does not
see other processes. A team of torch's default size (one thread per core) on cores that other jobs
share therefore burns its time slices spinning at every barrier while the thread it waits for is not
running: a tiny edit took 108 s instead of 10 s (load ~9 on 2 cores), almost all of it user time spent
spinning. (From a second Python thread libgomp counts more threads than cores and throttles the spin,
which is why the same edit was fast in a worker thread.)

Passive waits alone are not the answer either: in a virtual machine a sleeping thread is slow to wake
on an idle core, so a 2-thread team with ``OMP_WAIT_POLICY=PASSIVE`` edited 1.5–3.5× slower than torch's
default on idle cores, while one thread was the fastest setting idle *and* the most graceful beside busy
processes (``benchmarks/results/shared_cpu.md``). So, what insightedit does (``docs/inference.md``,
"Threads on a shared machine"):

* before torch loads (the ``insightedit`` command; ``import insightedit.pipeline`` before ``torch``):
  one intra-op thread (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``) unless ``OMP_NUM_THREADS`` or
  ``INSIGHTEDIT_THREADS`` chose a count, and ``OMP_WAIT_POLICY=PASSIVE`` unless ``OMP_WAIT_POLICY`` or
  ``GOMP_SPINCOUNT`` is set, so a team someone asks for never spins on a busy machine;
* when torch was loaded first, an :class:`~insightedit.pipeline.EditPipeline` call on the CPU runs with
  one intra-op thread (restored afterwards), unless the threads were chosen;
* ``INSIGHTEDIT_THREADS=N`` sets N intra-op threads everywhere; ``INSIGHTEDIT_THREADS=off`` leaves
  torch and OpenMP exactly as they are; ``OMP_NUM_THREADS`` set by the user is always respected, and
  so is a count set with ``torch.set_num_threads`` before an edit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager

THREADS_VARIABLE = "INSIGHTEDIT_THREADS"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def requested_threads(environ: Mapping[str, str] | None = None) -> int | str | None:
    """``INSIGHTEDIT_THREADS``: a positive count, ``"off"``, or ``None`` when unset or empty.

    Raises:
        UserError: the value is neither a positive integer nor ``off``.
    """
    value = (os.environ if environ is None else environ).get(THREADS_VARIABLE, "").strip().lower()
    if not value:
        return None
    if value == "off":
        return "off"
    if value.isdigit() and int(value) > 0:
        return int(value)
    from insightedit.errors import UserError

    raise UserError(f"{THREADS_VARIABLE}={value!r}: give a positive number of threads or 'off'")


def prepare_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set OpenMP's variables for a process whose torch has not loaded yet; return what was set.

    ``OMP_WAIT_POLICY=PASSIVE`` unless a wait variable is set or ``INSIGHTEDIT_THREADS=off``;
    ``OMP_NUM_THREADS=N`` when ``INSIGHTEDIT_THREADS=N``. Nothing once torch is imported (libgomp
    reads its variables when it loads) or when the user set the variable.
    """
    environ = os.environ if environ is None else environ
    requested = requested_threads(environ)
    if requested == "off" or "torch" in sys.modules:
        return {}
    changes: dict[str, str] = {}
    if not any(environ.get(name) for name in WAIT_VARIABLES):
        changes["OMP_WAIT_POLICY"] = "PASSIVE"
    if isinstance(requested, int):
        changes["OMP_NUM_THREADS"] = str(requested)
        changes["MKL_NUM_THREADS"] = str(requested)
    elif not environ.get("OMP_NUM_THREADS"):  # nothing chosen: one intra-op thread (module docstring)
        changes["OMP_NUM_THREADS"] = "1"
        changes["MKL_NUM_THREADS"] = "1"
    environ.update(changes)
    return changes


def configure_threads() -> dict[str, str]:
    """What the ``insightedit`` command calls first: :func:`prepare_environment` on ``os.environ``."""
    return prepare_environment()


def default_thread_count() -> int:
    """The intra-op thread count torch starts with when nothing chose one: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_for_cpu_call(current: int, environ: Mapping[str, str] | None = None) -> int | None:
    """The intra-op threads a CPU edit should run with, or ``None`` to leave ``current`` as it is."""
    environ = os.environ if environ is None else environ
    requested = requested_threads(environ)
    if requested == "off":
        return None
    if isinstance(requested, int):
        return requested
    if environ.get("OMP_NUM_THREADS") or current != default_thread_count():
        return None  # the user chose
    return 1 if current > 1 else None


@contextmanager
def cpu_call_threads(device_type: str) -> Iterator[int | None]:
    """Run the block (on the calling thread) with :func:`threads_for_cpu_call` threads; restore after.

    Yields the count set, or ``None`` when nothing changed (a GPU call, or the settings were chosen).
    OpenMP's thread count belongs to the calling thread, so a call from a worker thread (a web demo's)
    sets that thread's count.
    """
    import torch

    current = torch.get_num_threads()
    threads = threads_for_cpu_call(current) if device_type == "cpu" else None
    if threads is None or threads == current:
        yield None
        return
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(current)
