"""Sequential CPU offload of the MLLM: its weights stay in CPU memory and stream to the accelerator a block at a time.

Built on accelerate's :func:`accelerate.cpu_offload` (what diffusers' ``enable_sequential_cpu_offload`` uses):
every parameter of the comprehension model is replaced by a ``meta`` tensor, the real (CPU) tensors are
kept in one state dict, and an :class:`accelerate.hooks.AlignDevicesHook` on each *block* copies that
block's weights to the execution device just before its forward and drops them (back to ``meta``) just
after. A block is one of the classes transformers itself never splits across devices (the LLaVA's
``_no_split_modules``: each LLaMA decoder layer, each CLIP encoder layer, the CLIP embeddings), which load
whole, LoRA adapters included; every other module that owns parameters (the projector's two linears,
the [MM]-rows embedding and its frozen base, the final norm, the layer norms of the vision tower) is its
own block. Buffers (rotary frequencies, position ids: a few KB) stay on the execution device.

So at most one block's weights are on the accelerator at a time: for LLaVA-1.5-7B a LLaMA decoder layer,
202.4M parameters + 0.26M of LoRA, 405 MB in 16 bit, against 14.1 GB for the whole model. The cost is
copying the weights of every block that runs (all but the output head) on every edit.

:func:`offload_blocks` lists the same blocks without installing anything (``insightedit plan --edit`` sizes
the largest one on a ``meta`` build), by the same rule accelerate's ``attach_align_device_hook`` applies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, remove_hook_from_module
from accelerate.utils import find_tied_parameters, retie_parameters
from torch import nn


@dataclass
class OffloadBlock:
    """One unit of the stream: ``module``'s own parameters, or all of them below it when ``whole``."""

    name: str
    module: nn.Module
    whole: bool

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters this block brings to the accelerator."""
        return self.module.parameters(recurse=self.whole)

    def num_params(self) -> int:
        """How many numbers it brings (tied parameters once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def block_classes(model: nn.Module) -> list[str]:
    """Class names loaded whole: the ``_no_split_modules`` of the transformers models inside ``model``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return sorted(names)


def _has_direct_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def offload_blocks(model: nn.Module, classes: list[str] | None = None) -> list[OffloadBlock]:
    """The blocks :class:`SequentialOffload` streams, in module order; works on ``meta`` modules.

    Mirrors ``accelerate.hooks.attach_align_device_hook``: a module of a class in ``classes`` (default
    :func:`block_classes`) is one block with everything below it; any other module with tensors of its own
    is a block of those. Modules with buffers only are listed too (with no parameters), as accelerate hooks them.
    """
    classes = block_classes(model) if classes is None else classes
    blocks: list[OffloadBlock] = []

    def visit(module: nn.Module, name: str) -> None:
        whole = type(module).__name__ in classes
        if whole or _has_direct_tensors(module):
            blocks.append(OffloadBlock(name, module, whole))
        if whole:
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return blocks


def _offloading_hooks(module: nn.Module) -> list[AlignDevicesHook]:
    hook: ModelHook | None = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook] if hook is not None else []
    return [h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload]


def hooked_block_names(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that carry an offloading accelerate hook (what is really installed)."""
    return [name for name, module in model.named_modules() if _offloading_hooks(module)]


class SequentialOffload:
    """Sequential CPU offload installed on ``model`` (see the module docstring); :meth:`remove` undoes it.

    Args:
        model: the module to stream; its parameters must be on the CPU.
        execution_device: where each block runs (``cpu`` works and runs the same code path, moving nothing).
        pin_memory: page-lock the CPU copy so that copies to a CUDA device go at full PCIe speed and skip a
            staging copy (default: when ``execution_device`` is CUDA). It is pinned one tensor at a time.
    """

    def __init__(self, model: nn.Module, execution_device: torch.device, pin_memory: bool | None = None) -> None:
        self.model = model
        self.execution_device = torch.device(execution_device)
        off_cpu = {p.device.type for p in model.parameters()} - {"cpu"}
        if off_cpu:
            raise ValueError(f"sequential offload needs the weights on the CPU, found them on {sorted(off_cpu)}")
        self.tied = find_tied_parameters(model)
        if pin_memory is None:
            pin_memory = self.execution_device.type == "cuda" and torch.cuda.is_available()
        if pin_memory:
            for parameter in model.parameters():  # one tensor at a time: no second copy of the model
                if not parameter.data.is_pinned():
                    parameter.data = parameter.data.pin_memory()
        self.pinned = bool(pin_memory)
        self.classes = block_classes(model)
        self._own_forward = {id(m) for m in model.modules() if "forward" in vars(m)}
        cpu_offload(model, self.execution_device, offload_buffers=False, preload_module_classes=self.classes)
        self.installed = True

    def remove(self) -> None:
        """Remove every hook and put the real weights back into ``model`` (on the CPU), ties restored."""
        if not self.installed:
            return
        remove_hook_from_module(self.model, recurse=True)
        for module in self.model.modules():  # accelerate leaves the original bound method as an attribute
            if "forward" in vars(module) and id(module) not in self._own_forward:
                del module.forward
        retie_parameters(self.model, self.tied)
        self.installed = False


__all__ = ["OffloadBlock", "SequentialOffload", "block_classes", "hooked_block_names", "offload_blocks"]
