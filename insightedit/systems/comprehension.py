"""The comprehension module: a LightningModule that trains LLaVA's LoRA and [MM] rows with ``L_LLM``.

It trains on its own on batches holding ``mllm_source`` (CLIP-normalised images at the model's image
size) and ``instruction`` (strings), and is reused inside the InsightEdit system, which reads ``h`` and
the patch features from :meth:`forward`. Its checkpoints hold only the trainable weights (LoRA and the
[MM] rows) and the hyperparameters, never the frozen base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from insightedit.models.comprehension import ComprehensionOutput, build_comprehension
from insightedit.models.loading import load_pretrained
from insightedit.training.optimizer import adamw


class ComprehensionModule(L.LightningModule):
    """LLaVA + LoRA + [MM] tokens trained with ``L_LLM`` (NLL of the [MM] tokens).

    Args:
        preset: ``"tiny"`` (CPU twin) or ``"full"`` (llava-1.5-7b-hf; meta device without ``pretrained``).
        pretrained: a llava-hf hub id or local folder.
        num_mm_tokens: r, the number of [MM] tokens.
        lora_rank, lora_alpha, lora_dropout, lora_target_modules: LoRA on the language model (rank 0: none).
        quantization: ``None``, ``"4bit"`` or ``"8bit"`` (bitsandbytes base).
        gradient_checkpointing: recompute the LLM's activations in the backward pass.
        learning_rate, weight_decay: AdamW settings of the LoRA group.
        mm_learning_rate, mm_weight_decay: the same for the [MM] rows (``None``: the LoRA group's).
        dtype: load dtype of ``pretrained`` weights (e.g. ``"bfloat16"``).
    """

    def __init__(
        self,
        preset: str = "tiny",
        pretrained: str | None = None,
        num_mm_tokens: int = 32,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        quantization: str | None = None,
        gradient_checkpointing: bool = False,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        mm_learning_rate: float | None = None,
        mm_weight_decay: float | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_comprehension(
            preset=preset,
            pretrained=pretrained,
            num_mm_tokens=num_mm_tokens,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_target_modules=lora_target_modules,
            quantization=quantization,
            gradient_checkpointing=gradient_checkpointing,
            dtype=dtype,
        )
        load_pretrained(self.model)  # the weights ``pretrained`` names, after the build

    def forward(
        self, pixel_values: torch.Tensor, instructions: list[str], compute_loss: bool = True
    ) -> ComprehensionOutput:
        """``h`` (B, r, d_llm), patch features (B, P, d_vision) and ``L_LLM`` for a batch."""
        return self.model(pixel_values, instructions, compute_loss=compute_loss)

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """``L_LLM`` of a batch with ``mllm_source`` (B, 3, H, W) and ``instruction`` (B strings)."""
        out = self.model(batch["mllm_source"], list(batch["instruction"]), compute_loss=True)
        assert out.loss_llm is not None
        return out.loss_llm

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One ``L_LLM`` step; logs ``train/loss_llm``."""
        loss = self._loss(batch)
        self.log("train/loss_llm", loss, prog_bar=True, batch_size=batch["mllm_source"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """``L_LLM`` on held-out pairs; logs ``val/loss_llm``."""
        loss = self._loss(batch)
        self.log("val/loss_llm", loss, prog_bar=True, batch_size=batch["mllm_source"].shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with two groups: the LoRA matrices and the [MM] rows (the frozen rows are in neither)."""
        hp = dict(self.hparams)
        groups = self.model.trainable_parameter_groups()
        settings = {
            "lora": (hp["learning_rate"], hp["weight_decay"]),
            "mm_embeddings": (
                hp["learning_rate"] if hp["mm_learning_rate"] is None else hp["mm_learning_rate"],
                hp["weight_decay"] if hp["mm_weight_decay"] is None else hp["mm_weight_decay"],
            ),
        }
        param_groups = [
            {"params": groups[name], "lr": lr, "weight_decay": decay, "name": name}
            for name, (lr, decay) in settings.items()
            if groups[name]
        ]
        return adamw(param_groups)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state-dict entries of the parameters that train (LoRA and the [MM] rows)."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {key: value for key, value in self.state_dict().items() if key in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable weights in Lightning checkpoints, never the frozen base."""
        checkpoint["state_dict"] = self.trainable_state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill the frozen weights from this freshly built module, so loading stays strict for the rest."""
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

    def save_trainable(self, directory: str | Path) -> Path:
        """Write the LoRA adapter (peft format) and the [MM] rows (safetensors)."""
        return self.model.save_trainable(directory)

    def load_trainable(self, directory: str | Path) -> None:
        """Load what :meth:`save_trainable` wrote."""
        self.model.load_trainable(directory)
