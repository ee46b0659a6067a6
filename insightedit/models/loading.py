"""Loading named weights is a step of its own, after construction.

Constructors build architectures: they may read a local folder's small config files (``config.json``, a
tokenizer) but never a weight file, and never ask the hub, so a full-size editor builds on ``meta`` at
once. A part whose config names weights (``comprehension.pretrained``, ``generation.pretrained``,
``bridging.clip_pretrained``) is a :class:`PretrainedPart` that remembers where they are;
:func:`load_pretrained` loads every such part of a module (an editor, a system) once, reporting each
load on the ``insightedit.loads`` logger (:mod:`insightedit.models.loads`).

Parts whose weights shape how they are built stay loading in their constructor: a bitsandbytes-quantized
LLaVA (quantized while it is read) and a folder written by ``save_pretrained`` read through
``from_pretrained`` class methods (those are loads by name).
"""

from __future__ import annotations

import torch
from torch import nn


class PretrainedPart:
    """A mixin for a module built without its named weights: :meth:`load_pretrained` reads them.

    ``pretrained`` names the weights (``None``: nothing to load); ``pretrained_loaded`` says whether they are in.
    """

    pretrained: str | None = None
    pretrained_loaded: bool = False

    @property
    def pretrained_pending(self) -> bool:
        """Whether weights are named and not loaded yet."""
        return self.pretrained is not None and not self.pretrained_loaded

    def load_pretrained(self) -> None:
        """Read the named weights into this part (a one-line :class:`~insightedit.errors.UserError` if absent)."""
        raise NotImplementedError


def pending_parts(module: nn.Module) -> dict[str, PretrainedPart]:
    """The parts of ``module`` (itself included) with named weights not loaded yet, by name."""
    return {
        name: part
        for name, part in module.named_modules()
        if isinstance(part, PretrainedPart) and part.pretrained_pending
    }


def load_pretrained(module: nn.Module) -> list[str]:
    """Load the named weights of every part of ``module`` that has them; return the parts' names.

    Parts already loaded are left alone, so calling this twice loads nothing the second time.
    """
    parts = pending_parts(module)
    for part in parts.values():
        part.load_pretrained()
        part.pretrained_loaded = True
    return list(parts)


def assign_or_copy(
    module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True, take: bool = False
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``module``: copied into real tensors, or taken as they are where the module is on ``meta``.

    ``take=True`` (for a ``state`` nothing else keeps, e.g. a just-loaded ``from_pretrained`` model's) also
    takes the tensors into a real module when each matches its tensor's dtype and device: the module's
    built tensors are freed instead of overwritten, so the loaded model and the built one are never both
    in memory (a memory-mapped file's tensors are read as they are used; the values are the same).
    Returns ``load_state_dict``'s missing and unexpected keys (with ``strict=False``).
    """
    on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    own = module.state_dict(keep_vars=True) if take and not on_meta else {}
    same = bool(own) and all(
        name in own and own[name].dtype == tensor.dtype and own[name].device == tensor.device
        for name, tensor in state.items()
    )
    result = module.load_state_dict(state, strict=strict, assign=on_meta or same)
    return list(result.missing_keys), list(result.unexpected_keys)


__all__ = ["PretrainedPart", "assign_or_copy", "load_pretrained", "pending_parts"]
