"""Inference: ``EditPipeline`` (image + instruction → edited image, any member) and the exported model folder."""

from insightedit.pipeline.pipeline import EditOutput, EditPipeline, InsightEditPipeline
from insightedit.pipeline.settings import SCHEDULERS

__all__ = ["SCHEDULERS", "EditOutput", "EditPipeline", "InsightEditPipeline"]
