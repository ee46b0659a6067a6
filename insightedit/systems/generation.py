"""The generation module: a LightningModule that trains the editing UNet with the diffusion loss.

It trains :class:`insightedit.models.generation.generator.EditGenerator` (held as ``model``) on its own,
conditioned on the frozen text encoder's encoding of the instruction or on ``text_embeds`` given in the
batch. The math (the loss, CFG dropout, timestep sampling, the sampler) lives in the generator; the zoo's
members hold a generator directly (:mod:`insightedit.models.editor`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from insightedit.models.generation.generator import PREDICTION_TYPES, EditGenerator
from insightedit.training.optimizer import adamw


def log_skipped_samples(module: L.LightningModule, batch: dict[str, Any]) -> None:
    """Log ``train/skipped_samples``: records replaced by the next usable one so far, summed over ranks.

    The count comes from the batch's collated ``load_failures`` (see :class:`insightedit.data.dataset.EditDataset`;
    batches without it add 0). It is kept as a tensor on the module's device, so no step waits on it,
    and counts from 0 in each process (a resumed run starts again at 0).
    """
    failures = batch.get("load_failures")
    total = getattr(module, "_skipped_samples", None)
    if total is None:
        total = torch.zeros((), device=module.device)
    if isinstance(failures, torch.Tensor):
        total = total + failures.to(total.device, torch.float32).sum()
    module._skipped_samples = total
    module.log("train/skipped_samples", total, on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=True)


class GenerationModule(L.LightningModule):
    """Train an :class:`EditGenerator` with its diffusion loss (InstructPix2Pix-style, on its own).

    Args:
        learning_rate, weight_decay: AdamW settings.
        generator: every other argument is the generator's (see :class:`EditGenerator`).
    """

    def __init__(
        self,
        preset: str = "tiny",
        pretrained: str | None = None,
        image_embed_dim: int | None = None,
        num_image_tokens: int = 4,
        image_scale: float = 1.0,
        unet_config: dict[str, Any] | None = None,
        latent: str = "auto",
        with_text_encoder: bool = True,
        text_encoder: str | None = None,
        train_unet: bool = True,
        train_image_branch: bool = True,
        drop_text_prob: float = 0.05,
        drop_source_prob: float = 0.05,
        drop_both_prob: float = 0.05,
        prediction_type: str = "epsilon",
        residual: bool = False,
        timestep_power: float = 1.0,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-2,
        gradient_checkpointing: bool = False,
        device: str | None = None,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.save_hyperparameters()
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        del arguments["learning_rate"], arguments["weight_decay"]
        self.model = EditGenerator(**arguments)
        self.model.load_pretrained()  # the weights ``pretrained`` names, after the build

    def _text_condition(self, batch: dict[str, Any]) -> torch.Tensor:
        if "text_embeds" in batch:
            return batch["text_embeds"]
        return self.model.encode_text(list(batch["instruction"]))

    def _loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        return self.model.diffusion_loss(
            batch["source"], batch["target"], self._text_condition(batch), batch.get("image_embeds"),
            batch.get("v_txt"), generator=generator,
        )  # fmt: skip

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One diffusion-loss step on a batch with ``source``, ``target`` and ``instruction`` or ``text_embeds``."""
        loss = self._loss(batch)
        self.log("train/loss_diff", loss, prog_bar=True, batch_size=batch["source"].shape[0])
        log_skipped_samples(self, batch)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The same loss on held-out pairs, with a fixed noise draw per batch so epochs compare."""
        generator = torch.Generator(device=batch["source"].device).manual_seed(batch_idx)
        loss = self._loss(batch, generator)
        self.log("val/loss_diff", loss, prog_bar=True, batch_size=batch["source"].shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters."""
        parameters = [p for p in self.parameters() if p.requires_grad]
        return adamw(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)

    @torch.no_grad()
    def edit(self, source: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """:meth:`EditGenerator.edit` (instructions as strings or ``f_txt``)."""
        return self.model.edit(source, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """:meth:`EditGenerator.save_pretrained`."""
        self.model.save_pretrained(directory)


__all__ = ["PREDICTION_TYPES", "GenerationModule", "log_skipped_samples"]
