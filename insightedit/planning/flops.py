"""Training FLOPs per sample, counted from one forward and backward of the member's own step on ``meta``.

Counting: :meth:`insightedit.models.editor.Editor.compute_losses` runs for the configured stage on one
sample of the configured sizes, on the ``meta`` device (the tiny twin: on real tensors), then its loss's
backward, under a dispatch mode that adds the FLOPs of every matrix product, convolution and attention by
PyTorch's own formulas (:data:`torch.utils.flop_counter.flop_registry`: 2 FLOPs per multiply-add;
elementwise work, norms and softmax are not counted, as in every MFU figure). The MLLM and the frozen text
encoder run their own layers at the real sequence lengths
(:func:`insightedit.planning.meta_forward.shared_modules_by_parts`). Each FLOP goes to the part of the
module that was running (forward) or whose gradient was being computed (backward), then to a group:
``mllm`` (LLaVA, LoRA, [MM] rows), ``bridge`` (Q-Former, BIM, Mapper, edit head), ``unet`` (UNet and
image branch) and ``encoders`` (VAE, text encoder, the IAA target's CLIP tower: frozen, forward only).

What the backward costs follows from autograd itself: a frozen layer computes no weight gradient, but it
does compute the gradient of its input when something before it trains (the frozen LLaMA layers under
LoRA and the [MM] rows, the frozen VAE never). Gradient checkpointing recomputes the forward of each
checkpointed block whose output needs a gradient once more in the backward (LLaMA and CLIP encoder layers
when the comprehension section checkpoints, UNet ResNet and transformer blocks when the generation
section does; FSDP2's per-block checkpointing covers both): counted as ``recompute``.

Stacks of identical transformer layers (an ``nn.ModuleList`` of three or more LLaMA decoder, HF CLIP
encoder or open_clip ViT layers of equal parameter shapes) run two layers deep while counting: the second
layer's FLOPs count once for every layer after the first (the first stays apart, since its input may need
no gradient where the later ones' do). The count is the same as running all of them (a test checks it),
and the 7B model's 32 layers cost the plan two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

GROUP_OF_PART = {
    "llava": "mllm",
    "lora": "mllm",
    "mm_embeddings": "mllm",
    "qformer": "bridge",
    "bim": "bridge",
    "mapper": "bridge",
    "edit_head": "bridge",
    "unet": "unet",
    "image_branch": "unet",
    "vae": "encoders",
    "text_encoder": "encoders",
    "clip_image_encoder": "encoders",
}
GROUPS = ("mllm", "bridge", "unet", "encoders", "other")
MLLM_BLOCKS = ("LlamaDecoderLayer", "CLIPEncoderLayer")
UNET_BLOCKS = ("ResnetBlock2D", "Transformer2DModel")
# layers whose stacks run each layer on the previous one's output alone (a UNet block's ResNets also pop skips)
STACKED_LAYERS = ("LlamaDecoderLayer", "CLIPEncoderLayer", "ResidualAttentionBlock")


def _cpu_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward(
    grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad.shape, query.shape, key.shape, value.shape)


# the CPU's fused attention (real tensors of the tiny twin) has no formula in torch's registry; meta tensors
# take the math path, whose matrix products are counted
EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


@dataclass
class GroupFlops:
    """FLOPs of one group for one training sample."""

    forward: int = 0
    backward: int = 0
    recompute: int = 0  # forwards run again by gradient checkpointing

    @property
    def total(self) -> int:
        """Forward + backward + recompute."""
        return self.forward + self.backward + self.recompute

    def as_dict(self) -> dict[str, int]:
        """Plain data."""
        return {"forward": self.forward, "backward": self.backward, "recompute": self.recompute, "total": self.total}


def _is_stack(modules: nn.ModuleList) -> bool:
    """Three or more transformer layers (:data:`STACKED_LAYERS`) of one class with equal parameter shapes."""
    layers = list(modules)
    if len(layers) < 3 or len({type(layer) for layer in layers}) != 1:
        return False
    if type(layers[0]).__name__ not in STACKED_LAYERS:
        return False
    shapes = [[tuple(p.shape) for p in layer.parameters()] for layer in layers]
    return bool(shapes[0]) and all(s == shapes[0] for s in shapes)


@contextmanager
def _truncated(owner: nn.Module, name: str, layers: nn.ModuleList) -> Iterator[None]:
    owner._modules[name] = nn.ModuleList(list(layers)[:2])
    try:
        yield
    finally:
        owner._modules[name] = layers


@contextmanager
def two_layer_stacks(root: nn.Module) -> Iterator[dict[str, int]]:
    """Within the block every stack of identical layers in ``root`` is two layers deep.

    Yields ``{name of each stack's second layer: how many layers it stands for}``.
    """
    scales: dict[str, int] = {}
    with ExitStack() as stack:
        for name, module in list(root.named_modules()):
            if isinstance(module, nn.ModuleList) and _is_stack(module) and not any(
                name.startswith(f"{other}.") for other in (n.rsplit(".", 1)[0] for n in scales)
            ):
                owner_name, _, attribute = name.rpartition(".")
                owner = root.get_submodule(owner_name) if owner_name else root
                scales[f"{name}.1"] = len(module) - 1
                stack.enter_context(_truncated(owner, attribute, module))
        yield scales


class FlopsByGroup(TorchDispatchMode):
    """Adds each op's FLOPs to the group of the module running it (see the module docstring)."""

    def __init__(
        self,
        root: nn.Module,
        group_of: Callable[[str], str],
        checkpointed: tuple[str, ...],
        scales: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.groups = {group: GroupFlops() for group in GROUPS}
        self.backward = False
        self._checkpointed = checkpointed
        self._active: list[tuple[str, int]] = []  # (group, scale) of the modules running or being differentiated
        self._block: list[int] = []  # FLOPs of the outermost checkpointed block now running (forward)
        self._handles: list[Any] = []
        scales = scales or {}
        self._entries: dict[int, tuple[str, int]] = {}
        for name, module in root.named_modules():
            if name:
                scale = next((n for layer, n in scales.items() if name == layer or name.startswith(f"{layer}.")), 1)
                self._entries[id(module)] = (group_of(name), scale)

    def _current(self) -> tuple[str, int]:
        return self._active[-1] if self._active else ("other", 1)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        formula = flop_registry.get(packet) or EXTRA_FORMULAS.get(packet)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out)) if packet in flop_registry else formula(*args, **kwargs)
            group, scale = self._current()
            flops *= scale
            counted = self.groups[group]
            if self.backward:
                counted.backward += flops
            else:
                counted.forward += flops
                if self._block:
                    self._block[0] += flops
        return out

    # ----------------------------------------------------------------------------- module tracking
    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        entry = self._entries.get(id(module))
        if entry is None:
            return
        self._active.append(entry)
        if type(module).__name__ in self._checkpointed and not self._block:
            self._block.append(0)
            module._planned_block = True  # type: ignore[attr-defined]  # the outermost one
        inputs = [a for a in tree_leaves(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        if inputs:  # the backward leaves this module once its inputs' gradients are made
            self._handles.append(register_multi_grad_hook(inputs, lambda grads: self._leave_backward(entry)))

    def _exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        entry = self._entries.get(id(module))
        if entry is None:
            return
        if self._active:
            self._active.pop()
        outputs = [a for a in tree_leaves(output) if isinstance(a, torch.Tensor) and a.requires_grad]
        if getattr(module, "_planned_block", False):
            del module._planned_block  # type: ignore[attr-defined]
            if outputs:  # the backward needs this block's saved tensors: a checkpoint recomputes its forward
                self.groups[entry[0]].recompute += self._block[0]
            self._block.clear()
        if outputs:  # the backward enters this module once its outputs' gradients are ready
            self._handles.append(register_multi_grad_hook(outputs, lambda grads: self._active.append(entry)))

    def _leave_backward(self, entry: tuple[str, int]) -> None:
        if self.backward and entry in self._active:
            del self._active[len(self._active) - 1 - self._active[::-1].index(entry)]

    @contextmanager
    def tracking(self) -> Iterator[FlopsByGroup]:
        """Within the block, module hooks follow which group runs; the dispatch mode counts."""
        hooks = [
            nn.modules.module.register_module_forward_pre_hook(self._enter),
            nn.modules.module.register_module_forward_hook(self._exit),
        ]
        try:
            with self:
                yield self
        finally:
            for hook in hooks + self._handles:
                hook.remove()
            self._handles.clear()


def count_training_flops(
    editor: nn.Module,
    step: Callable[[], torch.Tensor],
    group_of: Callable[[str], str],
    checkpointed: tuple[str, ...] = (),
    stacks_two_deep: bool = True,
) -> dict[str, GroupFlops]:
    """FLOPs per group of ``step()`` (a forward returning the loss) and the loss's backward.

    ``group_of`` maps a module's name in ``editor`` to its group; ``checkpointed``: class names of the
    blocks gradient checkpointing wraps (their forward is counted again when the backward needs them);
    ``stacks_two_deep``: count stacks of identical layers from two of them (see the module docstring).
    """
    with two_layer_stacks(editor) if stacks_two_deep else nullcontext({}) as scales:
        counter = FlopsByGroup(editor, group_of, checkpointed, scales)
        with counter.tracking():
            loss = step()
            counter.backward = True
            counter._active.clear()
            if loss.requires_grad:
                loss.backward()
    return {group: flops for group, flops in counter.groups.items() if flops.total}


def checkpointed_blocks(llm_checkpointing: bool, unet_checkpointing: bool) -> tuple[str, ...]:
    """Class names of the blocks the settings checkpoint."""
    return (MLLM_BLOCKS if llm_checkpointing else ()) + (UNET_BLOCKS if unet_checkpointing else ())


def group_of_part(part: str) -> str:
    """The FLOP group of a part of the parameter table."""
    return GROUP_OF_PART.get(part, "other")


__all__ = [
    "GROUPS", "FlopsByGroup", "GroupFlops", "checkpointed_blocks", "count_training_flops", "group_of_part",
    "two_layer_stacks",
]  # fmt: skip
