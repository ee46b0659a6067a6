"""glibc by model size: freed blocks between live ones go back (large models); small ones' activations stay."""

import subprocess
import sys

import pytest
import torch

SCRIPT = """
import sys, torch
from insightedit.training.host_memory import return_freed_memory

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "fixed":
    assert return_freed_memory()
block = torch.ones(4 * 2**20)  # a 16 MiB block, freed: glibc then raises its mmap threshold unless it is fixed
del block
before = anon_mib()
big, kept = [], []
for _ in range(64):
    big.append(torch.ones(2**20))  # 4 MiB each, 256 MiB in all
    kept.append(torch.ones(2**16))  # 256 KiB each, still alive after the big ones go
del big
print(anon_mib() - before)
"""


def _left_mib(mode: str) -> float:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_between_live_ones_are_returned_once_the_threshold_is_fixed():
    assert _left_mib("default") > 200  # the holes stay resident: 256 MiB freed, almost none returned
    assert _left_mib("fixed") < 40  # only the 16 MiB still alive (and allocator slack)


FAULTS_SCRIPT = """
import resource, sys, torch
from insightedit.training.host_memory import return_freed_memory, suit_heap_to_model

assert return_freed_memory()  # as the commands start: 128 KiB threshold
model = torch.nn.Linear(2048, 2048) if sys.argv[1] == "small" else torch.nn.Linear(12000, 12000, device="meta")
switched = suit_heap_to_model(model)
for _ in range(5):  # warm up: the heap grows once
    torch.ones(2**18).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    torch.ones(2**18).sum()  # a 1 MiB activation, freed at once
print(switched, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(size: str) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, size], capture_output=True, text=True, check=True)
    switched, faults = run.stdout.split()[-2:]
    return switched, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_small_model_s_activations_come_from_the_heap_and_a_large_one_s_stay_mapped():
    switched, faults = _faults("small")  # 16 MiB of parameters
    assert switched == "True" and faults < 2_000  # no page is faulted in again
    switched, faults = _faults("large")  # 576 MB of parameters (on meta)
    assert switched == "False" and faults > 100 * 200  # every 1 MiB block mapped and faulted anew (256 pages each)


def test_parameter_bytes_count_each_parameter_once_at_its_dtype():
    from insightedit.training.host_memory import parameter_bytes

    layer = torch.nn.Linear(10, 4, dtype=torch.float16)
    shared = torch.nn.Sequential(layer, layer)  # the same parameters twice: counted once
    assert parameter_bytes(shared) == (10 * 4 + 4) * 2
