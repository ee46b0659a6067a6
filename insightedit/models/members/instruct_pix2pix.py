"""InstructPix2Pix (CVPR 2023): the frozen CLIP text encoder reads the instruction; the UNet edits.

The baseline every MLLM-guided editor starts from: no MLLM, no bridge, no image branch. Its UNet is the
one the other members' full presets load (``timbrooks/instruct-pix2pix``), and its tiny twin is the
stand-in the tiny members start from.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from insightedit.models.editor import EditConditions, Editor
from insightedit.models.generation.generator import EditGenerator

LEARNING_RATES = {"unet": 1e-4}


class InstructPix2PixEditor(Editor):
    """Instruction → frozen text encoder → ``f_txt`` → UNet (with the source latent concatenated).

    Args:
        generation: the UNet without an image branch, with its frozen text encoder.
    """

    member: ClassVar[str] = "instruct_pix2pix"
    groups: ClassVar[tuple[str, ...]] = ("unet",)
    losses: ClassVar[tuple[str, ...]] = ("diff",)
    optimizer_groups: ClassVar[dict[str, tuple[str, ...]]] = {"unet": ("unet",)}
    stages: ClassVar[dict[int, dict[str, Any]]] = {
        number: {
            "name": "edit",
            "train": ("unet",),
            "loss_weights": {"diff": 1.0},
            "use_bim": False,
            "learning_rates": dict(LEARNING_RATES),
        }
        for number in (1, 2, 3)  # one recipe: a stage number from a shared yaml trains the same thing
    }

    def __init__(self, generation: EditGenerator) -> None:
        super().__init__()
        if generation.text_encoder is None:
            raise ValueError("InstructPix2Pix reads the instruction with the text encoder: keep with_text_encoder")
        if generation.unet.image_embed_dim is not None:
            raise ValueError("InstructPix2Pix has no image branch: set generation.image_embed_dim to 0")
        self.generation = generation

    def understanding_modules(self) -> list[nn.Module]:
        """The frozen text encoder."""
        encoder = self.generation.text_encoder
        return [encoder] if encoder is not None else []

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The UNet."""
        return {"unet": list(self.generation.unet.parameters())}

    def conditions(
        self, batch: dict[str, Any], latent_size: tuple[int, int], losses: frozenset[str] = frozenset()
    ) -> EditConditions:
        """``f_txt``: the frozen text encoder's encoding of the instruction (B, 77, D)."""
        return EditConditions(self.generation.encode_text(list(batch["instruction"])))


def build_instruct_pix2pix(preset: str = "tiny", generation: dict[str, Any] | None = None) -> InstructPix2PixEditor:
    """Build the InstructPix2Pix member of ``preset`` (full: ``timbrooks/instruct-pix2pix`` when named)."""
    arguments = dict(generation or {})
    if arguments.get("image_embed_dim"):
        raise ValueError("instruct_pix2pix has no image branch: remove generation.image_embed_dim")
    arguments["image_embed_dim"] = 0
    return InstructPix2PixEditor(EditGenerator(preset=preset, **arguments))


__all__ = ["InstructPix2PixEditor", "build_instruct_pix2pix"]
