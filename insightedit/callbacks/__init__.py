"""Lightning callbacks of the runs: edited images, RNG state for exact resume, NaN guard, progress, held-out metrics."""

from insightedit.callbacks.held_out import HeldOutMetrics
from insightedit.callbacks.image_logging import EditImageLogger
from insightedit.callbacks.nonfinite import NonFiniteGuard, TrainingDiverged
from insightedit.callbacks.progress import StepProgressBar
from insightedit.callbacks.rng_state import RNGStateCallback
from insightedit.callbacks.summary import ModelSummaryTable

__all__ = [
    "EditImageLogger",
    "HeldOutMetrics",
    "ModelSummaryTable",
    "NonFiniteGuard",
    "RNGStateCallback",
    "StepProgressBar",
    "TrainingDiverged",
]
