"""Hardware planning: parameter counts, memory per device, FLOPs and GPU-hours, from a config, with no weights.

Names load on first use, so that ``insightedit plan`` can answer from its cache (or refuse a bad config)
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MemoryPlan": "insightedit.planning.memory",
    "ModuleCount": "insightedit.planning.inventory",
    "count_modules": "insightedit.planning.inventory",
    "plan_memory": "insightedit.planning.memory",
}

__all__ = ["MemoryPlan", "ModuleCount", "count_modules", "plan_memory"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'insightedit.planning' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
