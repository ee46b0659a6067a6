"""The comprehension module: LLaVA + LoRA reads (image, instruction) and answers with r [MM] tokens."""

from insightedit.models.comprehension.model import ComprehensionModel, ComprehensionOutput
from insightedit.models.comprehension.presets import PRESETS, build_comprehension, build_llava
from insightedit.models.comprehension.prompts import EncodedPrompts, PromptEncoder
from insightedit.models.comprehension.tokens import mm_token_names

__all__ = [
    "PRESETS",
    "ComprehensionModel",
    "ComprehensionOutput",
    "EncodedPrompts",
    "PromptEncoder",
    "build_comprehension",
    "build_llava",
    "mm_token_names",
]
