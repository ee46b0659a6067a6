"""Inference: ``EditPipeline`` (image + instruction → edited image, any member) and the exported model folder."""

from insightedit.console import quiet_library_noise

quiet_library_noise()  # before the libraries below are imported (bitsandbytes speaks on import)

from insightedit.threads import prepare_environment  # noqa: E402

prepare_environment()  # OpenMP's passive waits, when this import comes before torch's (insightedit/threads.py)

from insightedit.pipeline.pipeline import EditOutput, EditPipeline, InsightEditPipeline  # noqa: E402
from insightedit.pipeline.settings import SCHEDULERS  # noqa: E402

__all__ = ["SCHEDULERS", "EditOutput", "EditPipeline", "InsightEditPipeline"]
