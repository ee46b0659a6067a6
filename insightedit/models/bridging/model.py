"""The bridging model: Q-Former, BIM and IAA between the MLLM and the diffusion model, and their losses.

It takes ``h`` (B, r, d_llm), the MLLM's last hidden states at the [MM] positions, and the vision
encoder's patch features, and gives the UNet its text condition ``f_txt``, the feature map ``v_txt``
added after ``conv_in``, and the IAA embedding ``image_embeds`` that the generation module expands into
``f_img``. The losses of stage 1 (alignment to the frozen text encoder) and ``L_IAA`` live here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from insightedit.models.bridging.bim import BidirectionalInteraction
from insightedit.models.bridging.iaa import ClipImageEncoder, Mapper
from insightedit.models.bridging.qformer import QFormerBridge


@dataclass
class BridgeOutput:
    """What the bridge hands the generation module (and stage 1's alignment loss)."""

    q: torch.Tensor  # (B, 77, D_txt) Q-Former output mapped to the text width (stage-1 alignment input)
    f_txt: torch.Tensor  # (B, 77, D_txt) text condition for the UNet (== q when BIM is off or fresh)
    v_txt: torch.Tensor | None  # (B, C0, h, w) or None when BIM is off
    image_embeds: torch.Tensor | None  # (B, D_clip) Mapper(h), the IAA embedding (None without a Mapper)


class BridgingModel(nn.Module):
    """Q-Former + BIM + IAA Mapper, with the frozen CLIP image encoder that supervises the Mapper.

    Args:
        qformer: learned queries reading ``h`` (:class:`QFormerBridge`).
        bim: the bidirectional interaction module (:class:`BidirectionalInteraction`); ``None``: none
            (InsightEdit w/o BIM), ``f_txt = q`` and ``v_txt`` is None.
        mapper: IAA's Mapper (:class:`Mapper`); ``None``: no IAA stream (SmartEdit, InsightEdit w/o IAA).
        clip_image_encoder: frozen CLIP image tower for ``L_IAA`` targets (``None``: no IAA loss).
        use_bim: run the BIM (stage 3); when ``False`` it is skipped, ``f_txt = q`` and ``v_txt`` is None.
    """

    def __init__(
        self,
        qformer: QFormerBridge,
        bim: BidirectionalInteraction | None,
        mapper: Mapper | None,
        clip_image_encoder: ClipImageEncoder | None,
        use_bim: bool = True,
    ) -> None:
        super().__init__()
        self.qformer = qformer
        self.bim = bim
        self.mapper = mapper
        self.clip_image_encoder = clip_image_encoder
        self.use_bim = use_bim and bim is not None

    def forward(
        self,
        h: torch.Tensor,
        vision_features: torch.Tensor | None,
        vision_grid: tuple[int, int],
        latent_size: tuple[int, int],
        mm_mask: torch.Tensor | None = None,
    ) -> BridgeOutput:
        """Bridge ``h`` (B, r, d_llm) and patch features (B, gh*gw[+1], d_vision) to the UNet's conditions.

        ``mm_mask`` (B, r) marks valid [MM] positions (all valid when ``None``); the Q-Former's
        cross-attention and the Mapper's pooling ignore the others. ``vision_features`` may be ``None``
        only when the BIM is off.
        """
        q = self.qformer(h, mm_mask)  # (B, Nq, D_txt)
        image_embeds = self.mapper(h, mm_mask) if self.mapper is not None else None  # (B, D_clip)
        if not self.use_bim or self.bim is None:
            return BridgeOutput(q=q, f_txt=q, v_txt=None, image_embeds=image_embeds)
        if vision_features is None:
            raise ValueError("the BIM needs vision_features (set use_bim=False to run without them)")
        f_txt, v_txt = self.bim(q, vision_features, vision_grid, latent_size)  # (B, Nq, D_txt), (B, C0, h, w)
        return BridgeOutput(q=q, f_txt=f_txt, v_txt=v_txt, image_embeds=image_embeds)

    @torch.no_grad()
    def clip_target(self, clip_target_pixels: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP image embedding (B, D_clip) of CLIP-normalised target pixels (B, 3, S, S)."""
        if self.clip_image_encoder is None:
            raise RuntimeError("this BridgingModel was built without a CLIP image encoder (no IAA target)")
        return self.clip_image_encoder.encode_image(clip_target_pixels)

    def iaa_loss(self, image_embeds: torch.Tensor, clip_target_pixels: torch.Tensor) -> torch.Tensor:
        """``L_IAA``: MSE between ``image_embeds`` (B, D_clip) and the frozen CLIP embedding of the target."""
        target = self.clip_target(clip_target_pixels)  # (B, D_clip), no graph
        if target.shape != image_embeds.shape:
            raise ValueError(f"CLIP target {tuple(target.shape)} vs image_embeds {tuple(image_embeds.shape)}")
        return F.mse_loss(image_embeds.float(), target.float())

    def alignment_loss(self, q: torch.Tensor, caption_embeds: torch.Tensor) -> torch.Tensor:
        """Stage-1 alignment: MSE between q (B, 77, D_txt) and the frozen text encoder's caption encoding."""
        if caption_embeds.shape != q.shape:
            raise ValueError(f"caption_embeds {tuple(caption_embeds.shape)} vs q {tuple(q.shape)}")
        return F.mse_loss(q.float(), caption_embeds.detach().float())

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable-by-design parameters by component; the frozen CLIP encoder is never included."""
        groups = {"qformer": list(self.qformer.parameters())}
        if self.bim is not None:
            groups["bim"] = list(self.bim.parameters())
        if self.mapper is not None:
            groups["mapper"] = list(self.mapper.parameters())
        return groups

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts per component (CLIP included, under ``clip``)."""
        counts = {name: sum(p.numel() for p in params) for name, params in self.parameter_groups().items()}
        clip = self.clip_image_encoder
        counts["clip"] = sum(p.numel() for p in clip.parameters()) if clip is not None else 0
        return counts
