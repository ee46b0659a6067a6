"""Run-time choices of the pipeline: device, precision, and the sampler (DDIM, Euler ancestral, DPM-Solver++)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from insightedit.errors import UserError

# name -> (diffusers class, extra config); every sampler starts from the generation module's schedule
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, or the best available: CUDA, then Apple's MPS, then the CPU."""
    if device is not None and str(device) != "auto":
        resolved = torch.device(device)
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device} requested but CUDA is not available here")
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The given precision, or the device's best: bf16 on CUDA that has it, else fp16; fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    if resolved == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support; use --dtype float16")
    return resolved


def make_scheduler(base: SchedulerMixin, choice: str | SchedulerMixin) -> SchedulerMixin:
    """A fresh sampler of kind ``choice`` (a name in :data:`SCHEDULERS` or an instance) on ``base``'s schedule."""
    if isinstance(choice, SchedulerMixin):
        return choice
    if choice not in SCHEDULERS:
        raise UserError(f"unknown scheduler {choice!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[choice]
    return cls.from_config(base.config, **extra)
