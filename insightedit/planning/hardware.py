"""Named GPUs: whether a plan's memory fits on each, and how many GPU-hours its FLOPs take.

Memory verdict: a card *fits* a plan when the estimate plus :data:`CONTEXT_GIB` (the CUDA context and
cuBLAS/cuDNN workspaces, which the estimate leaves out) plus :data:`FRAGMENTATION` of the estimate (the
caching allocator's fragmentation and transient buffers the count does not see) is within the card's
memory; *tight* when it fits with the context but not with the fragmentation margin (it may run, with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, or fail at the first long batch); otherwise *no*.
Card memory is what ``nvidia-smi`` reports as total, in GiB.

Time: GPU-hours = FLOPs per sample × samples ÷ (peak dense bf16 tensor FLOP/s × MFU) ÷ 3600, where MFU
(model FLOP utilisation) is the fraction of peak a training run sustains — 30–50 % is typical of large
mixed workloads; :data:`DEFAULT_MFU` is assumed unless given. Peaks are the vendors' dense (no sparsity)
bf16 figures.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
CONTEXT_GIB = 1.0
FRAGMENTATION = 0.10
DEFAULT_MFU = 0.40
PAPER_PAIRS = 202_822  # AdvancedEdit training pairs in the paper


@dataclass(frozen=True)
class Gpu:
    """A GPU by name: its memory (GiB, as nvidia-smi reports) and dense bf16 peak (TFLOP/s)."""

    name: str
    memory_gib: float
    bf16_tflops: float


GPUS = (
    Gpu("RTX 3090/4090 24 GB", 24.0, 71.0),  # bf16 with fp32 accumulation: 3090 71, 4090 165 (not timed)
    Gpu("A100 40 GB", 40.0, 312.0),
    Gpu("A100 80 GB", 80.0, 312.0),
    Gpu("H100 SXM 80 GB", 79.6, 989.0),
    Gpu("H200 141 GB", 140.4, 989.0),
)
TIMED = ("A100 80 GB", "H100 SXM 80 GB")  # the cards GPU-hours are quoted for


def memory_verdict(estimate_gib: float, gpu: Gpu) -> str:
    """``fits``, ``tight`` or ``no`` for an estimate on ``gpu`` (see the module docstring)."""
    if estimate_gib * (1 + FRAGMENTATION) + CONTEXT_GIB <= gpu.memory_gib:
        return "fits"
    if estimate_gib + CONTEXT_GIB <= gpu.memory_gib:
        return "tight"
    return "no"


def gpu_hours(flops_per_sample: float, samples: float, gpu: Gpu, mfu: float = DEFAULT_MFU) -> float:
    """GPU-hours to train ``samples`` samples of ``flops_per_sample`` on ``gpu`` at ``mfu`` of its peak."""
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    return flops_per_sample * samples / (gpu.bf16_tflops * 1e12 * mfu) / 3600


def gpu_named(name: str) -> Gpu:
    """The GPU of :data:`GPUS` called ``name``."""
    return next(gpu for gpu in GPUS if gpu.name == name)


__all__ = [
    "CONTEXT_GIB", "DEFAULT_MFU", "FRAGMENTATION", "GPUS", "PAPER_PAIRS", "TIMED",
    "Gpu", "gpu_hours", "gpu_named", "memory_verdict",
]  # fmt: skip
