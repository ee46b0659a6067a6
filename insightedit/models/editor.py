"""The one interface every editor of the zoo implements: batch → conditions → losses, and edits.

An :class:`Editor` is a plain ``nn.Module`` (no Lightning). It holds an
:class:`~insightedit.models.generation.generator.EditGenerator` as ``generation`` (the UNet, its latent
space, schedule, diffusion loss and sampler) and whatever turns an instruction into the UNet's
conditions: a frozen text encoder (InstructPix2Pix), an MLLM and an edit head (MGIE), an MLLM, a
Q-Former and a BIM (SmartEdit), and the IAA stream on top (InsightEdit).

A member says what it can train (:attr:`Editor.groups`), which losses it can weigh
(:attr:`Editor.losses`), how groups share a learning rate (:attr:`Editor.optimizer_groups`) and its
stages' defaults (:attr:`Editor.stages`); :class:`insightedit.systems.editor_system.EditorSystem`
trains any member with no member-specific code, and the pipeline, ``export``, ``edit``, ``demo`` and
``plan`` use the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from insightedit.models.comprehension.model import ComprehensionModel
from insightedit.models.generation.generator import EditGenerator
from insightedit.models.stages import StageSettings


@dataclass
class EditConditions:
    """What the UNet reads for one batch of edits."""

    f_txt: torch.Tensor  # (B, L, D_txt) the text condition (cross-attention)
    image_embeds: torch.Tensor | None = None  # (B, D_clip) the IAA embedding, expanded to f_img (or None)
    v_txt: torch.Tensor | None = None  # (B, C0, h, w) added after conv_in (or None)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # member losses computed on the way (e.g. llm)

    def to(self, device: torch.device, dtype: torch.dtype) -> EditConditions:
        """The conditions on ``device`` in ``dtype`` (losses are left as they are)."""

        def move(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.to(device=device, dtype=dtype)

        f_txt = move(self.f_txt)
        assert f_txt is not None
        return EditConditions(f_txt, move(self.image_embeds), move(self.v_txt), self.aux)

    def select(self, rows: list[int]) -> EditConditions:
        """The conditions of some rows of the batch."""

        def pick(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value[rows]

        return EditConditions(self.f_txt[rows], pick(self.image_embeds), pick(self.v_txt), {})


class Editor(nn.Module):
    """An instruction-based image editor built from the shared modules.

    Subclasses set the class attributes and implement :meth:`conditions` and :meth:`parameter_groups`;
    the diffusion loss and the edit are shared. A batch is a dict with ``source`` and ``target``
    (B, 3, H, W) in [-1, 1], ``instruction`` (B strings) and, for members with an MLLM,
    ``mllm_source`` (B, 3, S, S), plus what a member's own losses read (``clip_target``,
    ``plain_instruction``...). At inference only ``mllm_source`` and ``instruction`` are given.
    """

    member: ClassVar[str] = ""
    groups: ClassVar[tuple[str, ...]] = ()
    losses: ClassVar[tuple[str, ...]] = ("diff",)
    optimizer_groups: ClassVar[dict[str, tuple[str, ...]]] = {}
    stages: ClassVar[dict[int, dict[str, Any]]] = {}

    generation: EditGenerator

    # ---------------------------------------------------------------------------------- structure
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter some stage may train, by group (keys: :attr:`groups`)."""
        raise NotImplementedError

    def apply_stage(self, stage: StageSettings) -> None:
        """Switch stage-dependent behaviour (e.g. whether the BIM runs); freezing is the system's job."""

    @property
    def mllm(self) -> ComprehensionModel | None:
        """The multimodal LLM, if the member has one (the pipeline streams or quantizes it)."""
        return None

    def understanding_modules(self) -> list[nn.Module]:
        """What runs before the UNet at inference (the pipeline's first half in the low-memory modes)."""
        return []

    def parts(self) -> dict[str, nn.Module]:
        """The editor's parts by name, as its constructor takes them (an exported folder saves each on its own).

        The default is the direct submodules (``comprehension``, ``bridging``, ``head``, ``generation``...);
        a member that keeps other submodules overrides it. :meth:`from_parts` is the inverse.
        """
        return dict(self.named_children())

    def options(self) -> dict[str, Any]:
        """The member's options (the registry's ``Member.options``, e.g. ``align_target``) with this editor's values.

        Each option is read from the attribute of the same name; with :meth:`parts` it is what the
        constructor takes.
        """
        from insightedit.models.zoo import get_member  # the registry imports this module

        entry = get_member(self.member) if self.member else None
        return {name: getattr(self, name) for name in (entry.options if entry else ())}

    @classmethod
    def from_parts(cls, parts: dict[str, nn.Module], **options: Any) -> Editor:
        """Assemble the editor from its parts and options (what :meth:`parts` and :meth:`options` give)."""
        return cls(**parts, **options)

    def load_pretrained(self) -> list[str]:
        """Read the weights the parts' configs name (``pretrained``, ``clip_pretrained``); return the parts loaded.

        The constructor reads none (a full-size editor builds on ``meta`` at once); this is the separate
        step (:func:`insightedit.models.loading.load_pretrained`). Parts already loaded are skipped.
        """
        from insightedit.models.loading import load_pretrained

        return load_pretrained(self)

    def persistent_buffers(self) -> set[str]:
        """Names (in this editor) of buffers drawn at build time that a checkpoint must keep."""
        return set()

    def needs_mllm_view(self) -> bool:
        """Whether :meth:`conditions` reads ``mllm_source``."""
        return self.mllm is not None

    def mllm_image_size(self) -> int:
        """The square size the MLLM reads its image at (0 without an MLLM)."""
        mllm = self.mllm
        return int(mllm.image_size) if mllm is not None else 0

    # ------------------------------------------------------------------------------------ compute
    def latent_size(self, source: torch.Tensor) -> tuple[int, int]:
        """The latent's spatial size for source images (B, 3, H, W)."""
        down = self.generation.latent_space.downsample
        return source.shape[-2] // down, source.shape[-1] // down

    def conditions(
        self, batch: dict[str, Any], latent_size: tuple[int, int], losses: frozenset[str] = frozenset()
    ) -> EditConditions:
        """The UNet's conditions for ``batch``; member losses named in ``losses`` go in ``aux``."""
        raise NotImplementedError

    def compute_losses(self, batch: dict[str, Any], stage: StageSettings) -> dict[str, torch.Tensor]:
        """Every loss ``stage`` weighs, and their weighted sum under ``loss``."""
        wanted = frozenset(name for name in self.losses if stage.weight(name) > 0 and name != "diff")
        source = batch["source"]
        conditions = self.conditions(batch, self.latent_size(source), wanted)
        losses = {name: value for name, value in conditions.aux.items() if name in wanted}
        if stage.use_unet and stage.weight("diff") > 0:
            losses["diff"] = self.generation.diffusion_loss(
                source,
                batch["target"],
                conditions.f_txt,
                image_embeds=conditions.image_embeds,
                v_txt=conditions.v_txt,
            )
        missing = wanted - set(losses)
        if missing:
            raise RuntimeError(f"{type(self).__name__} did not compute the losses {sorted(missing)}")
        losses["loss"] = sum(stage.weight(name) * value for name, value in losses.items())  # type: ignore[assignment]
        return losses

    @torch.no_grad()
    def edit(
        self,
        source: torch.Tensor,
        mllm_source: torch.Tensor | None,
        instructions: list[str],
        image_scale: float | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Edit ``source`` (B, 3, H, W) in [-1, 1]; the conditions are computed once, the UNet once per step.

        ``sampling``: :meth:`EditGenerator.edit`'s ``text_guidance``, ``image_guidance``,
        ``num_inference_steps``, ``generator`` and ``scheduler``. ``image_scale``: λ for members with
        an image branch (ignored by the others).
        """
        batch = {"instruction": list(instructions), "mllm_source": mllm_source}
        conditions = self.conditions(batch, self.latent_size(source))
        return self.generate(source, conditions, image_scale=image_scale, **sampling)

    @torch.no_grad()
    def generate(
        self, source: torch.Tensor, conditions: EditConditions, image_scale: float | None = None, **sampling: Any
    ) -> torch.Tensor:
        """The UNet's half of :meth:`edit`: sample the edited images from ready conditions."""
        unet = self.generation.unet
        previous = unet.image_scale
        if image_scale is not None and unet.image_embed_dim is not None:
            unet.image_scale = image_scale
        try:
            return self.generation.edit(
                source,
                f_txt=conditions.f_txt,
                image_embeds=conditions.image_embeds,
                v_txt=conditions.v_txt,
                **sampling,
            )
        finally:
            unet.image_scale = previous


__all__ = ["EditConditions", "Editor"]
