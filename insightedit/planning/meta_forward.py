"""Run a member's own training step (or its conditions) with no weights, to count what it keeps and makes.

The planners count activations by running the editor itself on the ``meta`` device (or on the tiny
twin's real tensors): :meth:`insightedit.models.editor.Editor.compute_losses` for a training step and
:meth:`~insightedit.models.editor.Editor.conditions` for an edit, with the batch a data module would give.
Nothing here knows a member: what runs is what the member runs.

Two shared modules cannot run on ``meta`` as they are and are stood in for while counting: the MLLM
(:class:`~insightedit.models.comprehension.model.ComprehensionModel`: LLaVA scatters the image features by
a data-dependent mask, and a full-size meta build has no tokenizer) and the frozen text encoder (no
tokenizer either). :func:`shared_modules_by_shape` gives zeros of their output shapes (the memory plan: the
MLLM's activations are a formula, see :mod:`insightedit.planning.activations`; the text encoder runs without
gradients and keeps nothing). :func:`shared_modules_by_parts` runs their own layers instead, on token ids
of the real lengths, for the FLOP count: the MLLM's vision tower, projector, language model over
``patches + text_tokens + r`` positions and its output head at the ``r`` [MM] positions, with ``h``
connected to the graph so that the bridge's gradients flow back through the language model as in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
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


def _mllm_by_parts(mllm: ComprehensionModel, text_tokens: int) -> Any:
    """``ComprehensionModel.forward`` through its own layers, with ``text_tokens`` instruction tokens of id 0."""
    model = mllm.base_model
    device, _ = _device_and_dtype(mllm)
    config: Any = model.config
    keep_cls = config.vision_feature_select_strategy == "full"

    def forward(
        pixel_values: torch.Tensor,
        instructions: list[str],
        compute_loss: bool = True,
        return_mm_rows: bool = False,
        **options: Any,
    ) -> ComprehensionOutput:  # options (MGIE's answers) lengthen the prompt: counted as text_tokens
        batch, r = len(instructions), mllm.num_mm_tokens
        vision_dtype = model.model.vision_tower.get_input_embeddings().weight.dtype
        image = model.model.vision_tower(pixel_values.to(vision_dtype), output_hidden_states=True)
        patches = image.hidden_states[mllm.vision_feature_layer]  # (B, 1 + P, d_vision)
        projected = model.model.multi_modal_projector(patches if keep_cls else patches[:, 1:])  # (B, P, d_llm)
        with torch.device(device):
            text_ids = torch.zeros(batch, text_tokens, dtype=torch.long)
            mm_ids = (mllm.first_mm_id + torch.arange(r)).expand(batch, r)
        text, mm = mllm.input_rows(text_ids), mllm.input_rows(mm_ids)  # (B, T, d_llm), (B, r, d_llm)
        embeds = torch.cat([projected.to(text.dtype), text, mm], dim=1)  # (B, s, d_llm)
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state  # (B, s, d_llm)
        h = hidden[:, -r:]  # (B, r, d_llm)
        loss = None
        if compute_loss:  # each [MM] token predicted from the position before it
            logits = mllm.output_rows(hidden[:, -r - 1 : -1].reshape(batch * r, -1))  # (B·r, V')
            loss = F.cross_entropy(logits.float(), mm_ids.reshape(-1))
        return ComprehensionOutput(
            h=h, vision_features=patches[:, 1:], loss_llm=loss, mm_rows=mm if return_mm_rows else None
        )

    return forward


def _text_encoder_by_parts(encoder: FrozenTextEncoder) -> Any:
    """``FrozenTextEncoder.forward`` through its own model, on ids of the padded length (77)."""
    device, _ = _device_and_dtype(encoder)

    def forward(texts: list[str]) -> torch.Tensor:
        with torch.no_grad(), torch.device(device):
            ids = torch.zeros(len(texts), encoder.max_length, dtype=torch.long)
            return encoder.model(ids).last_hidden_state

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


@contextmanager
def shared_modules_by_parts(editor: nn.Module, text_tokens: int) -> Iterator[None]:
    """Within the block, every MLLM and frozen text encoder of ``editor`` runs its own layers on placeholder ids."""
    with ExitStack() as stack:
        for module in editor.modules():
            if isinstance(module, ComprehensionModel):
                stack.enter_context(_replaced_forward(module, _mllm_by_parts(module, text_tokens)))
            elif isinstance(module, FrozenTextEncoder):
                stack.enter_context(_replaced_forward(module, _text_encoder_by_parts(module)))
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


__all__ = ["EXAMPLE_INSTRUCTION", "example_batch", "shared_modules_by_parts", "shared_modules_by_shape"]
