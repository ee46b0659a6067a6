"""What a member of the zoo is made of: parameters and trainable parameters per named part.

Parts are found by the parameter's name in an :class:`~insightedit.systems.editor_system.EditorSystem`
(``editor.<section>.…``) or in its :class:`~insightedit.models.editor.Editor` (``<section>.…``), the same
for every member: a member has the parts its sections build, and parameters of a section this table does
not know fall in ``other``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SYSTEM_PREFIX = "editor."  # where an EditorSystem keeps its editor

# (part, prefix of the parameter's name in the editor, substring it must contain); the first match wins
PARTS: tuple[tuple[str, str, str], ...] = (
    ("lora", "comprehension.", "lora_"),
    ("mm_embeddings", "comprehension.", "new_rows"),
    ("llava", "comprehension.", ""),
    ("qformer", "bridging.qformer.", ""),
    ("bim", "bridging.bim.", ""),
    ("mapper", "bridging.mapper.", ""),
    ("clip_image_encoder", "bridging.clip_image_encoder.", ""),
    ("edit_head", "head.", ""),
    ("image_branch", "generation.unet.image_projection.", ""),
    ("image_branch", "generation.unet.unet.", ".processor."),
    ("unet", "generation.unet.unet.", ""),
    ("vae", "generation.latent_space.", ""),
    ("text_encoder", "generation.text_encoder.", ""),
)


@dataclass
class ModuleCount:
    """Parameter counts of one part, and the names that fall in it."""

    params: int = 0
    trainable: int = 0
    frozen_16bit_linear: int = 0  # frozen nn.Linear weights of the language model (what 4/8-bit quantizes)

    def as_dict(self) -> dict[str, int]:
        """``{"params": ..., "trainable": ...}``."""
        return {"params": self.params, "trainable": self.trainable}


def part_of(name: str) -> str:
    """The part a parameter belongs to, by its name in a system or an editor (``"other"`` if none)."""
    name = name.removeprefix(SYSTEM_PREFIX)
    for part, prefix, needle in PARTS:
        if name.startswith(prefix) and needle in name:
            return part
    return "other"


def count_modules(system: nn.Module) -> dict[str, ModuleCount]:
    """Counts per part of a system or an editor, in :data:`PARTS` order; parts with no parameters are left out."""
    counts: dict[str, ModuleCount] = {}
    linear_weights = {
        f"{name}.weight"
        for name, module in system.named_modules()
        if isinstance(module, nn.Linear) and ".language_model." in name and "lora_" not in name
    }
    for name, parameter in system.named_parameters():
        part = part_of(name)
        count = counts.setdefault(part, ModuleCount())
        count.params += parameter.numel()
        if parameter.requires_grad:
            count.trainable += parameter.numel()
        elif name in linear_weights or name.replace(".base_layer", "") in linear_weights:
            count.frozen_16bit_linear += parameter.numel()
    order = [p for p, _, _ in PARTS] + ["other"]
    return {part: counts[part] for part in dict.fromkeys(order) if part in counts}
