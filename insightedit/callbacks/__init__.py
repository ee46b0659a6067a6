"""Lightning callbacks of the training runs: edited-image logging, RNG state for exact resume, NaN guard, progress."""

from insightedit.callbacks.image_logging import EditImageLogger
from insightedit.callbacks.nonfinite import NonFiniteGuard, TrainingDiverged
from insightedit.callbacks.progress import StepProgressBar
from insightedit.callbacks.rng_state import RNGStateCallback
from insightedit.callbacks.summary import ModelSummaryTable

__all__ = [
    "EditImageLogger",
    "ModelSummaryTable",
    "NonFiniteGuard",
    "RNGStateCallback",
    "StepProgressBar",
    "TrainingDiverged",
]
