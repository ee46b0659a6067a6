"""InsightEdit (CVPR 2025), and SmartEdit and the ablations that share its modules.

MLLM (LLaVA + LoRA) → r [MM] states ``h`` → Q-Former → ``q``; the BIM lets ``q`` and the vision
encoder's patch features attend to each other and gives the text condition ``f_txt`` and the feature
map ``v_txt`` added after ``conv_in``; the IAA Mapper turns ``h`` into a CLIP image embedding, which the
UNet's decoupled cross-attention reads as ``f_img`` with weight λ.

The same class builds the members that leave parts out, so they are the *same code* minus a stream:
``insightedit_no_iaa`` (no Mapper, no CLIP tower, no image branch in the UNet), ``insightedit_no_bim``
(no BIM: ``f_txt = q``, no ``v_txt``) and ``smartedit`` (no IAA; aligned to the instruction it reads).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from insightedit.models.bridging.model import BridgingModel
from insightedit.models.bridging.presets import build_bridging
from insightedit.models.comprehension.model import ComprehensionModel
from insightedit.models.comprehension.presets import build_comprehension
from insightedit.models.editor import EditConditions, Editor
from insightedit.models.generation.generator import EditGenerator
from insightedit.models.stages import StageSettings

ALIGN_TARGETS = ("plain_instruction", "instruction", "target_caption")
LEARNING_RATES = {"lora": 2e-4, "bridge": 1e-4, "unet": 1e-5}


def optimizer_groups_of(groups: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """InsightEdit's learning-rate groups (``lora``, ``bridge``, ``unet``) restricted to the groups a member has."""
    every = {"lora": ("mm_embeddings", "lora"), "bridge": ("qformer", "mapper", "bim"), "unet": ("unet",)}
    return {name: tuple(g for g in members if g in groups) for name, members in every.items()}


def insightedit_stages(groups: tuple[str, ...], losses: tuple[str, ...]) -> dict[int, dict[str, Any]]:
    """InsightEdit's three stages restricted to the groups and losses a member has.

    1 *align*: [MM] rows, LoRA, Q-Former (and Mapper) with ``L_LLM + L_align (+ L_IAA)``, no UNet;
    2 *edit*: adds the UNet and ``L_diff``, BIM off, no alignment loss; 3 *full*: everything, every loss.
    """

    def keep(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name for name in names if name in groups)

    def weights(names: tuple[str, ...]) -> dict[str, float]:
        return {name: 1.0 for name in names if name in losses}

    return {
        1: {
            "name": "align",
            "train": keep(("mm_embeddings", "lora", "qformer", "mapper")),
            "loss_weights": weights(("llm", "align", "iaa")),
            "use_unet": False,
            "use_bim": False,
            "learning_rates": dict(LEARNING_RATES),
        },
        2: {
            "name": "edit",
            "train": keep(("mm_embeddings", "lora", "qformer", "mapper", "unet")),
            "loss_weights": weights(("llm", "iaa", "diff")),
            "use_bim": False,
            "learning_rates": dict(LEARNING_RATES),
        },
        3: {
            "name": "full",
            "train": groups,
            "loss_weights": weights(("llm", "iaa", "align", "diff")),
            "learning_rates": dict(LEARNING_RATES),
        },
    }


class InsightEditEditor(Editor):
    """MLLM → Q-Former → BIM (→ f_txt, v_txt) and → IAA Mapper (→ f_img) → UNet.

    Args:
        comprehension: LLaVA + LoRA + [MM] tokens.
        bridging: Q-Former, BIM (or none) and Mapper (or none) with the CLIP tower that supervises it.
        generation: the UNet (with an image branch exactly when the bridge has a Mapper) and its sampler.
        align_target: the text whose frozen text-encoder encoding ``q`` is aligned to (``L_align``):
            ``plain_instruction`` (the record's explicit phrasing, whichever phrasing the MLLM read),
            ``instruction`` (the phrasing read, SmartEdit's choice) or ``target_caption``.
    """

    member: ClassVar[str] = "insightedit"
    groups: ClassVar[tuple[str, ...]] = ("mm_embeddings", "lora", "qformer", "mapper", "bim", "unet")
    losses: ClassVar[tuple[str, ...]] = ("llm", "iaa", "align", "diff")
    optimizer_groups: ClassVar[dict[str, tuple[str, ...]]] = optimizer_groups_of(groups)
    stages: ClassVar[dict[int, dict[str, Any]]] = insightedit_stages(groups, losses)

    def __init__(
        self,
        comprehension: ComprehensionModel,
        bridging: BridgingModel,
        generation: EditGenerator,
        align_target: str = "plain_instruction",
    ) -> None:
        super().__init__()
        if align_target not in ALIGN_TARGETS:
            raise ValueError(f"align_target must be one of {ALIGN_TARGETS}, got {align_target!r}")
        if (bridging.mapper is None) != (generation.unet.image_embed_dim is None):
            raise ValueError("the IAA stream needs both the bridge's Mapper and the UNet's image branch, or neither")
        self.comprehension = comprehension
        self.bridging = bridging
        self.generation = generation
        self.align_target = align_target

    # ---------------------------------------------------------------------------------- structure
    @property
    def mllm(self) -> ComprehensionModel:
        """LLaVA with the [MM] tokens."""
        return self.comprehension

    def understanding_modules(self) -> list[nn.Module]:
        """The MLLM and the bridge."""
        return [self.comprehension, self.bridging]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """[MM] rows, LoRA, Q-Former, Mapper, BIM (those this member has), and the UNet."""
        groups: dict[str, list[nn.Parameter]] = {}
        groups.update(self.comprehension.trainable_parameter_groups())
        groups.update(self.bridging.parameter_groups())
        groups["unet"] = list(self.generation.unet.parameters())
        return {name: groups[name] for name in self.groups}

    def apply_stage(self, stage: StageSettings) -> None:
        """The BIM runs in the stages that say so."""
        self.bridging.use_bim = stage.use_bim and self.bridging.bim is not None

    def persistent_buffers(self) -> set[str]:
        """The bridge's buffers (the BIM's random Fourier matrix is drawn when the bridge is built)."""
        parts = ("bridging.qformer.", "bridging.bim.", "bridging.mapper.")
        return {name for name, _ in self.named_buffers() if name.startswith(parts)}

    # ------------------------------------------------------------------------------------ compute
    def conditions(
        self, batch: dict[str, Any], latent_size: tuple[int, int], losses: frozenset[str] = frozenset()
    ) -> EditConditions:
        """``f_txt``, ``v_txt`` and the IAA embedding; ``llm``, ``iaa`` and ``align`` losses on request."""
        instructions = list(batch["instruction"])
        understood = self.comprehension(batch["mllm_source"], instructions, compute_loss="llm" in losses)
        weight = next(self.bridging.qformer.parameters())
        h = understood.h.to(weight.dtype)
        vision = understood.vision_features.to(weight.dtype)
        bridge = self.bridging(h, vision, self.comprehension.vision_grid, latent_size)
        aux: dict[str, torch.Tensor] = {}
        if "llm" in losses:
            assert understood.loss_llm is not None
            aux["llm"] = understood.loss_llm
        if "iaa" in losses and bridge.image_embeds is not None:
            aux["iaa"] = self.bridging.iaa_loss(bridge.image_embeds, batch["clip_target"])
        if "align" in losses:
            texts = batch.get(self.align_target, batch["instruction"])  # batches without the key: what was read
            aux["align"] = self.bridging.alignment_loss(bridge.q, self.generation.encode_text(list(texts)))
        return EditConditions(bridge.f_txt, bridge.image_embeds, bridge.v_txt, aux)


class SmartEditEditor(InsightEditEditor):
    """SmartEdit (CVPR 2024): MLLM [MM] → Q-Former → BIM → UNet; no IAA, no decoupled attention, no CLIP tower."""

    member: ClassVar[str] = "smartedit"
    groups: ClassVar[tuple[str, ...]] = ("mm_embeddings", "lora", "qformer", "bim", "unet")
    losses: ClassVar[tuple[str, ...]] = ("llm", "align", "diff")
    optimizer_groups: ClassVar[dict[str, tuple[str, ...]]] = optimizer_groups_of(groups)
    stages: ClassVar[dict[int, dict[str, Any]]] = insightedit_stages(groups, losses)


class InsightEditNoIAAEditor(InsightEditEditor):
    """InsightEdit without the IAA stream: no Mapper, no CLIP tower, no image branch (the paper's "w/o IAA")."""

    member: ClassVar[str] = "insightedit_no_iaa"
    groups: ClassVar[tuple[str, ...]] = ("mm_embeddings", "lora", "qformer", "bim", "unet")
    losses: ClassVar[tuple[str, ...]] = ("llm", "align", "diff")
    optimizer_groups: ClassVar[dict[str, tuple[str, ...]]] = optimizer_groups_of(groups)
    stages: ClassVar[dict[int, dict[str, Any]]] = insightedit_stages(groups, losses)


class InsightEditNoBIMEditor(InsightEditEditor):
    """InsightEdit without the BIM: ``f_txt`` is the Q-Former's ``q``, no ``v_txt`` (the paper's "w/o BIM")."""

    member: ClassVar[str] = "insightedit_no_bim"
    groups: ClassVar[tuple[str, ...]] = ("mm_embeddings", "lora", "qformer", "mapper", "unet")
    losses: ClassVar[tuple[str, ...]] = ("llm", "iaa", "align", "diff")
    optimizer_groups: ClassVar[dict[str, tuple[str, ...]]] = optimizer_groups_of(groups)
    stages: ClassVar[dict[int, dict[str, Any]]] = {
        number: {**settings, "use_bim": False} for number, settings in insightedit_stages(groups, losses).items()
    }


VARIANTS: dict[str, type[InsightEditEditor]] = {
    "insightedit": InsightEditEditor,
    "smartedit": SmartEditEditor,
    "insightedit_no_iaa": InsightEditNoIAAEditor,
    "insightedit_no_bim": InsightEditNoBIMEditor,
}


def build_mllm_editor(
    member: str,
    preset: str = "tiny",
    comprehension: dict[str, Any] | None = None,
    bridging: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    align_target: str | None = None,
) -> InsightEditEditor:
    """Build ``member`` (one of :data:`VARIANTS`) of ``preset`` from its config sections.

    The widths that connect the parts (``d_llm``, ``d_vision``, the UNet's text width and ``conv_in``
    width, the IAA width) are read from the built MLLM and UNet; a section may still set them.
    """
    cls = VARIANTS[member]
    with_iaa = "mapper" in cls.groups
    with_bim = "bim" in cls.groups
    mllm = build_comprehension(preset=preset, **(comprehension or {}))
    generation_args = dict(generation or {})
    if not with_iaa:
        if generation_args.get("image_embed_dim"):
            raise ValueError(f"{member} has no IAA stream: remove generation.image_embed_dim")
        generation_args["image_embed_dim"] = 0
    generator = EditGenerator(preset=preset, **generation_args)
    unet = generator.unet
    wiring = {
        "d_llm": mllm.hidden_size,
        "d_vision": mllm.vision_hidden_size,
        "text_dim": int(unet.unet.config.cross_attention_dim),
        "unet_in_width": int(unet.unet.config.block_out_channels[0]),
        "clip_dim": unet.image_embed_dim,
    }
    bridge = build_bridging(preset=preset, with_bim=with_bim, with_mapper=with_iaa, **{**wiring, **(bridging or {})})
    default_target = "instruction" if member == "smartedit" else "plain_instruction"
    return cls(mllm, bridge, generator, align_target=align_target or default_target)


__all__ = [
    "ALIGN_TARGETS",
    "InsightEditEditor",
    "InsightEditNoBIMEditor",
    "InsightEditNoIAAEditor",
    "SmartEditEditor",
    "VARIANTS",
    "build_mllm_editor",
    "insightedit_stages",
    "optimizer_groups_of",
]
