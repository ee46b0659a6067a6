"""The bridging module as a LightningModule: trains the Q-Former and the IAA Mapper on precomputed inputs.

On its own it runs stage 1's bridge losses on batches whose MLLM states and text-encoder outputs were
computed ahead of time: ``L_IAA`` (Mapper vs frozen CLIP image embedding of the target) and the
alignment MSE (Q-Former output vs the frozen SD text encoder's encoding of the target caption). The BIM
gets no loss here (its outputs only reach the UNet), so it is neither run nor optimised; the InsightEdit
system trains it through ``L_diff`` in stage 3.

Batch keys: ``h`` (B, r, d_llm), ``clip_target`` (B, 3, S, S) CLIP-normalised target pixels,
``caption_embeds`` (B, 77, D_txt), and optionally ``mm_mask`` (B, r) and ``vision_features`` (unused here).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from insightedit.models.bridging.presets import build_bridging
from insightedit.models.loading import load_pretrained
from insightedit.training.optimizer import adamw

TRAINED_GROUPS = ("qformer", "mapper")


class BridgingModule(L.LightningModule):
    """Q-Former + IAA Mapper trained with ``iaa_weight * L_IAA + align_weight * L_align``.

    Args:
        preset: ``"tiny"`` or ``"full"`` (see :func:`insightedit.models.bridging.build_bridging`).
        d_llm, d_vision, text_dim, unet_in_width, clip_dim, num_queries: size overrides of the preset.
        clip_pretrained: CLIP weights for the IAA target (``None``: random CLIP, no download).
        iaa_weight, align_weight: loss weights.
        learning_rate, weight_decay: AdamW settings.
        group_learning_rates: per-group learning rates (``{"qformer": ..., "mapper": ...}``); missing
            groups use ``learning_rate``.
    """

    def __init__(
        self,
        preset: str = "tiny",
        d_llm: int | None = None,
        d_vision: int | None = None,
        text_dim: int | None = None,
        unet_in_width: int | None = None,
        clip_dim: int | None = None,
        num_queries: int = 77,
        clip_pretrained: str | None = None,
        iaa_weight: float = 1.0,
        align_weight: float = 1.0,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        group_learning_rates: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        unknown = set(group_learning_rates or {}) - set(TRAINED_GROUPS)
        if unknown:
            raise ValueError(f"group_learning_rates has unknown groups {sorted(unknown)}; use {TRAINED_GROUPS}")
        self.model = build_bridging(
            preset=preset,
            d_llm=d_llm,
            d_vision=d_vision,
            text_dim=text_dim,
            unet_in_width=unet_in_width,
            clip_dim=clip_dim,
            num_queries=num_queries,
            use_bim=False,
            clip_pretrained=clip_pretrained,
        )
        load_pretrained(self.model)  # the CLIP weights ``clip_pretrained`` names, after the build
        self.model.bim.requires_grad_(False)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Both bridge losses and their weighted sum for one batch."""
        h = batch["h"]  # (B, r, d_llm)
        mm_mask = batch.get("mm_mask")  # (B, r) or None
        q = self.model.qformer(h, mm_mask)  # (B, 77, D_txt)
        image_embeds = self.model.mapper(h, mm_mask)  # (B, D_clip)
        loss_iaa = self.model.iaa_loss(image_embeds, batch["clip_target"])
        loss_align = self.model.alignment_loss(q, batch["caption_embeds"])
        loss = self.hparams["iaa_weight"] * loss_iaa + self.hparams["align_weight"] * loss_align
        return {"loss": loss, "loss_iaa": loss_iaa, "loss_align": loss_align}

    def _log_losses(self, stage: str, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log each loss as ``{stage}/{name}``."""
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch_size)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One optimisation step on the weighted bridge losses."""
        losses = self.compute_losses(batch)
        self._log_losses("train", losses, batch["h"].shape[0])
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Log the bridge losses on held-out batches."""
        self._log_losses("val", self.compute_losses(batch), batch["h"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the Q-Former and Mapper, one parameter group each (CLIP and BIM excluded)."""
        rates = self.hparams["group_learning_rates"] or {}
        groups = self.model.parameter_groups()
        param_groups = [
            {
                "name": name,
                "params": [p for p in groups[name] if p.requires_grad],
                "lr": rates.get(name, self.hparams["learning_rate"]),
            }
            for name in TRAINED_GROUPS
        ]
        return adamw(
            param_groups, lr=self.hparams["learning_rate"], weight_decay=self.hparams["weight_decay"]
        )
