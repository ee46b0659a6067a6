"""Inference: ``InsightEditPipeline`` (image + instruction → edited image) and the exported model folder."""

from insightedit.pipeline.pipeline import EditOutput, InsightEditPipeline
from insightedit.pipeline.settings import SCHEDULERS

__all__ = ["SCHEDULERS", "EditOutput", "InsightEditPipeline"]
