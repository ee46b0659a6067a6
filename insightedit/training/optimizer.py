"""AdamW with torch's fused kernel wherever every parameter allows it.

On a CPU the fused AdamW step is ~4x faster than the per-tensor loop torch picks by default for the tiny
twin's ~470 trainable tensors (30 vs 119 ms a step for the tiny stage 3, one thread; ~12% of its whole
step). The fused kernel needs plain floating-point tensors on a CPU or a CUDA device; sharded (DTensor),
quantised or ``meta`` parameters keep torch's default choice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICES = frozenset({"cpu", "cuda"})


def can_fuse(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes every tensor of ``params`` (and there is one)."""
    found = False
    for param in params:
        found = True
        plain = type(param) in (torch.Tensor, torch.nn.Parameter)
        if not (plain and param.is_floating_point() and param.device.type in FUSED_DEVICES):
            return False
    return found


def adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, fused when :func:`can_fuse` says every parameter allows it.

    ``params`` is a list of tensors or of parameter groups (dicts with ``"params"``), as AdamW takes it.
    """
    params = list(params)
    tensors = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else params
    devices = {p.device.type for p in tensors}
    fused = can_fuse(tensors) and len(devices) == 1
    return torch.optim.AdamW(params, fused=True if fused else None, **kwargs)
