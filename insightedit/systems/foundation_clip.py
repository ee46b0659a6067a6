"""The tiny CLIP foundation's LightningModule: contrastive image-caption pretraining on synthetic scenes.

Trains :class:`~insightedit.models.foundations.clip.TinyClip` (every CLIP parameter, and the temperature)
with CLIP's symmetric InfoNCE loss. Validation embeds the held-out scenes and their captions and logs
zero-shot retrieval top-1 among them: ``val/retrieval_top1`` (image -> caption) and
``val/retrieval_top1_text`` (caption -> image), right when the retrieved text is the pair's own, word for
word; and ``val/retrieval_top1_true`` (image -> caption), right when the retrieved caption is any caption
the generator could have written for that image (another scene's ``a red circle on grey`` is true of an
image of a red circle at the top on grey). When fit ends it measures the final weights once more,
prints one line and writes ``export/`` (see :func:`~insightedit.models.foundations.clip.write_clip_export`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from insightedit.models.foundations.clip import TinyClip, retrieval_top1, write_clip_export
from insightedit.training.optimizer import adamw


def _metrics(
    images: torch.Tensor, texts: torch.Tensor, captions: list[str], true: list[frozenset[str]]
) -> dict[str, float]:
    """Retrieval top-1: word for word both ways, and image -> any caption true of the image."""
    image_to_text, text_to_image = retrieval_top1(images, texts, captions)
    image_to_true, _ = retrieval_top1(images, texts, captions, true)
    return {"retrieval_top1": image_to_text, "retrieval_top1_text": text_to_image, "retrieval_top1_true": image_to_true}


class FoundationClipSystem(L.LightningModule):
    """Pretrain the tiny CLIP contrastively; measure held-out retrieval; export the ``CLIPModel``.

    Args:
        learning_rate: AdamW's peak learning rate (linear warm-up, then cosine to 0 at ``max_steps``).
        weight_decay: AdamW weight decay of the matrices (not of norms, biases, embeddings, the temperature).
        warmup_steps: steps of linear warm-up.
        export_dir: where fit writes the export (default ``<default_root_dir>/export``).
        seed: initialises the CLIP (the run's ``seed_everything`` drives the data order and the rest).
    """

    def __init__(
        self,
        learning_rate: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        export_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.clip = TinyClip()
        self._val_images: list[torch.Tensor] = []
        self._val_texts: list[torch.Tensor] = []
        self._val_captions: list[str] = []
        self.last_metric: dict[str, float] = {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Symmetric InfoNCE over a batch of ``pixels`` (B, 3, 32, 32) and ``caption`` strings."""
        loss = self.clip.contrastive_loss(batch["pixels"], list(batch["caption"]))
        batch_size = batch["pixels"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/temperature", self.clip.model.logit_scale.exp().detach(), batch_size=batch_size)
        return loss

    def on_validation_epoch_start(self) -> None:
        """Start collecting held-out embeddings."""
        self._val_images, self._val_texts, self._val_captions = [], [], []
        self._val_true: list[frozenset[str]] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Embed a batch of held-out images and captions (ranked in :meth:`on_validation_epoch_end`)."""
        self._val_images.append(self.clip.encode_image(batch["pixels"]))
        self._val_texts.append(self.clip.encode_text(list(batch["caption"])))
        self._val_captions.extend(batch["caption"])
        self._val_true.extend(batch.get("true_captions") or [frozenset([c]) for c in batch["caption"]])

    def on_validation_epoch_end(self) -> None:
        """Log held-out retrieval top-1 among all held-out pairs, both ways."""
        if not self._val_captions:
            return
        images, texts = torch.cat(self._val_images), torch.cat(self._val_texts)
        self.last_metric = _metrics(images, texts, self._val_captions, self._val_true)
        for key, value in self.last_metric.items():
            self.log(f"val/{key}", value, prog_bar=key == "retrieval_top1")

    @torch.no_grad()
    def evaluate(self, loader: Any) -> dict[str, float]:
        """Retrieval top-1 of the current weights over every batch of ``loader`` ranked together."""
        was_training = self.training
        self.eval()
        images, texts, captions, true = [], [], [], []
        for batch in loader:
            images.append(self.clip.encode_image(batch["pixels"].to(self.device)))
            texts.append(self.clip.encode_text(list(batch["caption"])))
            captions.extend(batch["caption"])
            true.extend(batch.get("true_captions") or [frozenset([c]) for c in batch["caption"]])
        self.train(was_training)
        return _metrics(torch.cat(images), torch.cat(texts), captions, true)

    def export_path(self) -> Path:
        """``export_dir``, or ``<default_root_dir>/export``."""
        if self.hparams.export_dir:
            return Path(self.hparams.export_dir)
        return Path(self.trainer.default_root_dir) / "export"

    def on_fit_end(self) -> None:
        """Measure the final weights on the held-out scenes, print one line, write ``export/`` (rank 0)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        metric = self.evaluate(datamodule.val_dataloader()) if datamodule is not None else dict(self.last_metric)
        if not self.trainer.is_global_zero:
            return
        steps = int(self.trainer.global_step)
        path = write_clip_export(self.clip, self.export_path(), metric, steps)
        if metric:
            count = len(datamodule.val_dataloader().dataset) if datamodule is not None else 0
            print(
                f"clip foundation: held-out retrieval top-1 {metric['retrieval_top1']:.3f} image->caption, "
                f"{metric['retrieval_top1_text']:.3f} caption->image (among {count} scenes; any true caption: "
                f"{metric['retrieval_top1_true']:.3f} image->caption) after {steps} steps; "
                f"export {path}",
                flush=True,
            )
        for logger in self.loggers:  # the final value, also where validation did not run at the last step
            logger.log_metrics({f"final/{k}": v for k, v in metric.items()}, step=steps)

    def configure_optimizers(self) -> Any:
        """AdamW (decay on matrices only) with linear warm-up and a cosine decay to 0 at the run's last step."""
        decay = [p for n, p in self.clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in self.clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = adamw(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.learning_rate,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, min(self.hparams.warmup_steps, total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
