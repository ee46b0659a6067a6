"""Lightning callbacks of the training runs: edited-image logging, RNG state for exact resume, NaN guard."""

from insightedit.callbacks.image_logging import EditImageLogger
from insightedit.callbacks.nonfinite import NonFiniteGuard, TrainingDiverged
from insightedit.callbacks.rng_state import RNGStateCallback

__all__ = ["EditImageLogger", "NonFiniteGuard", "RNGStateCallback", "TrainingDiverged"]
