"""Activation memory: counted on the ``meta`` device where a forward runs there, by formula where not.

Counting: a forward pass with ``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd
keeps for the backward pass (parameters and repeated views of one tensor counted once, parameters not at
all). Nothing is allocated: on ``meta`` only shapes exist. With activation checkpointing the blocks that
would be checkpointed keep only their inputs, and one block at a time is recomputed, so the estimate is
``total − Σ saved(block) + Σ input(block) + max saved(block)``.

Formula (the MLLM, whose forward cannot run on ``meta`` because LLaVA scatters image features by a
data-dependent mask): Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models": a decoder layer keeps ``34·s·h`` bytes per sequence with 16-bit activations and a fused (flash /
SDPA) attention; with checkpointing each layer keeps its 16-bit input (``2·s·h``) and one layer is live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

CHECKPOINTED_BLOCKS = ("ResnetBlock2D", "Transformer2DModel", "SamTwoWayAttentionBlock", "Blip2QFormerLayer")


@dataclass
class SavedActivations:
    """Bytes autograd saves during one forward, in total and per checkpointable block."""

    total: int
    block_saved: list[int]
    block_inputs: list[int]

    def with_checkpointing(self) -> int:
        """Bytes kept when every counted block is checkpointed."""
        if not self.block_saved:
            return self.total
        return self.total - sum(self.block_saved) + sum(self.block_inputs) + max(self.block_saved)


def count_saved_activations(model: nn.Module, forward: Callable[[], object]) -> SavedActivations:
    """Run ``forward`` (which calls ``model``) and count what autograd saves, overall and per block."""
    parameters = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    keep_alive: list[torch.Tensor] = []
    total = 0
    stack: list[int] = []
    block_saved: list[int] = []
    block_inputs: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = tensor._base if tensor._base is not None else tensor
        if id(base) in parameters or id(base) in seen:
            return tensor
        seen.add(id(base))
        keep_alive.append(base)
        size = base.numel() * base.element_size()
        total += size
        if stack:
            block_saved[stack[-1]] += size
        return tensor

    def enter(module: nn.Module, args: tuple[object, ...]) -> None:
        if stack:  # only the outermost checkpointable block counts
            stack.append(stack[-1])
            return
        block_saved.append(0)
        block_inputs.append(sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)))
        stack.append(len(block_saved) - 1)

    def leave(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        stack.pop()

    handles = []
    for module in model.modules():
        if type(module).__name__ in CHECKPOINTED_BLOCKS:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return SavedActivations(total, block_saved, block_inputs)


def decoder_activation_bytes(
    layers: int, hidden: int, sequence: int, batch: int, bytes_per_value: int, checkpointing: bool
) -> int:
    """Activation bytes a decoder-only transformer keeps for backward (Korthikanti et al. 2022)."""
    scale = bytes_per_value / 2  # the formula's constants assume 16-bit activations
    per_layer = int(34 * sequence * hidden * batch * scale)
    if not checkpointing:
        return layers * per_layer
    return int(layers * 2 * sequence * hidden * batch * scale) + per_layer


def count_saved_by_part(
    root: nn.Module, forward: Callable[[], object], part_of: Callable[[str], str]
) -> dict[str, SavedActivations]:
    """What autograd saves during ``forward``, by the part of ``root`` whose module was running.

    ``part_of`` maps a module's name in ``root`` to its part; tensors saved while no module of ``root``
    ran (a loss computed in a method) go to the part of the last module that ran, or ``"other"``. Within
    a part, the outermost running checkpointable block (:data:`CHECKPOINTED_BLOCKS`) is tracked as in
    :func:`count_saved_activations`.
    """
    parameters = {id(p) for p in root.parameters()}
    seen: set[int] = set()
    keep_alive: list[torch.Tensor] = []
    results: dict[str, SavedActivations] = {}
    names: list[str] = []  # modules now running, innermost last
    last = ["other"]
    block: list[tuple[str, int]] = []  # (part, index in its lists) of the outermost running block
    block_depth = [0]

    def current() -> str:
        if block:  # everything a block saves is its part's (an image branch's processor inside a UNet block)
            return block[0][0]
        return part_of(names[-1]) if names else last[0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) in parameters or id(base) in seen:
            return tensor
        seen.add(id(base))
        keep_alive.append(base)
        size = base.numel() * base.element_size()
        result = results.setdefault(current(), SavedActivations(0, [], []))
        result.total += size
        if block:
            result.block_saved[block[0][1]] += size
        return tensor

    def enter(name: str, checkpointable: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...]) -> None:
            names.append(name)
            last[0] = part_of(name)
            if not checkpointable:
                return
            if block_depth[0] == 0:
                result = results.setdefault(last[0], SavedActivations(0, [], []))
                result.block_saved.append(0)
                result.block_inputs.append(
                    sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
                )
                block.append((last[0], len(result.block_saved) - 1))
            block_depth[0] += 1

        return hook

    def leave(checkpointable: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            names.pop()
            if checkpointable:
                block_depth[0] -= 1
                if block_depth[0] == 0:
                    block.clear()

        return hook

    handles = []
    for name, module in root.named_modules():
        if not name:
            continue
        checkpointable = type(module).__name__ in CHECKPOINTED_BLOCKS
        handles.append(module.register_forward_pre_hook(enter(name, checkpointable)))
        handles.append(module.register_forward_hook(leave(checkpointable)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return results
