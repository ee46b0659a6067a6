"""Hardware planning: parameter counts and memory per device, from a config, with no weights."""

from insightedit.planning.inventory import ModuleCount, count_modules
from insightedit.planning.memory import MemoryPlan, plan_memory

__all__ = ["MemoryPlan", "ModuleCount", "count_modules", "plan_memory"]
