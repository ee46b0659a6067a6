"""Run a member's own training step (or its conditions) with no weights, to count what it keeps and makes.

The planners count activations by running the editor itself on the ``meta`` device (or on the tiny
twin's real tensors): :meth:`insightedit.models.editor.Editor.compute_losses` for a training step and
:meth:`~insightedit.models.editor.Editor.conditions` for an edit, with the batch a data module would give.
Nothing here knows a member: what runs is what the member runs.

Two shared modules cannot run on ``meta`` and are stood in for while counting, with outputs of the exact
shapes they would give: the MLLM (:class:`~insightedit.models.comprehension.model.ComprehensionModel`:
LLaVA scatters the image features by a data-dependent mask; its activations are a formula, see
:mod:`insightedit.planning.activations`) and the frozen text encoder (a full-size meta build has no
tokenizer; it runs without gradients, so it keeps nothing for the backward pass either way).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from insightedit.models.comprehension.model import ComprehensionModel, ComprehensionOutput
from insightedit.models.text_encoder import FrozenTextEncoder

EXAMPLE_INSTRUCTION = "replace the red circle with a blue square"


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def _mllm_stand_in(mllm: ComprehensionModel) -> Any:
    """``ComprehensionModel.forward`` by shapes: ``h`` (B, r, d_llm), patches (B, P, d_vision), ``L_LLM``."""
    device, _ = _device_and_dtype(mllm)

    def forward(
        pixel_values: torch.Tensor, instructions: list[str], compute_loss: bool = True, **options: Any
    ) -> ComprehensionOutput:  # options (e.g. MGIE's answers) change the prompt, not the output's shapes
        batch = len(instructions)
        patches = mllm.vision_grid[0] * mllm.vision_grid[1]
        h = torch.zeros(batch, mllm.num_mm_tokens, mllm.hidden_size, device=device, requires_grad=True)
        vision = torch.zeros(batch, patches, mllm.vision_hidden_size, device=device)
        loss = torch.zeros((), device=device, requires_grad=True) if compute_loss else None
        return ComprehensionOutput(h=h, vision_features=vision, loss_llm=loss)

    return forward


def _text_encoder_stand_in(encoder: FrozenTextEncoder) -> Any:
    """``FrozenTextEncoder.forward`` by shapes: (B, 77, D), no gradient."""
    device, dtype = _device_and_dtype(encoder)

    def forward(texts: list[str]) -> torch.Tensor:
        return torch.zeros(len(texts), encoder.max_length, encoder.hidden_size, device=device, dtype=dtype)

    return forward


@contextmanager
def _replaced_forward(module: nn.Module, forward: Any) -> Iterator[None]:
    module.forward = forward  # type: ignore[method-assign]  # an instance attribute shadows the class's
    try:
        yield
    finally:
        del module.forward


@contextmanager
def shared_modules_by_shape(editor: nn.Module) -> Iterator[None]:
    """Within the block, every MLLM and frozen text encoder of ``editor`` returns zeros of its output shapes."""
    with ExitStack() as stack:
        for module in editor.modules():
            if isinstance(module, ComprehensionModel):
                stack.enter_context(_replaced_forward(module, _mllm_stand_in(module)))
            elif isinstance(module, FrozenTextEncoder):
                stack.enter_context(_replaced_forward(module, _text_encoder_stand_in(module)))
        yield


def example_batch(
    editor: Any, batch_size: int, resolution: int, clip_size: int = 224, mllm_size: int | None = None
) -> dict[str, Any]:
    """A batch as the data module collates it (images in [-1, 1] or CLIP-normalised), on the editor's device."""
    device, _ = _device_and_dtype(editor)
    mllm_size = mllm_size or editor.mllm_image_size() or resolution
    texts = [EXAMPLE_INSTRUCTION] * batch_size
    with torch.device(device):
        return {
            "source": torch.zeros(batch_size, 3, resolution, resolution),
            "target": torch.zeros(batch_size, 3, resolution, resolution),
            "mask": torch.zeros(batch_size, 1, resolution, resolution),
            "mllm_source": torch.zeros(batch_size, 3, mllm_size, mllm_size),
            "clip_target": torch.zeros(batch_size, 3, clip_size, clip_size),
            "instruction": texts,
            "plain_instruction": texts,
            "target_caption": ["a blue square on a table"] * batch_size,
            "task_type": ["replace"] * batch_size,
        }


__all__ = ["EXAMPLE_INSTRUCTION", "example_batch", "shared_modules_by_shape"]
