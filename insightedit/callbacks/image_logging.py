"""Every N steps, edit a fixed held-out batch and log ``source | edited | target`` with its instruction.

The batch is taken once from the validation split, so every logged grid shows the same pairs and the
run's progress reads left to right in W&B's media panel. Sampling uses its own seeded generator and
the RNG states are put back afterwards: logging images never changes what training draws. Modules go
to eval mode for the edit and return to their own modes after it (frozen parts may be kept in eval).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from insightedit.callbacks.rng_state import capture_rng_state, restore_rng_state


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


def triptychs(
    source: torch.Tensor, edited: torch.Tensor, target: torch.Tensor, min_height: int = 128
) -> list[np.ndarray]:
    """One ``source | edited | target`` strip per pair, upscaled (nearest) to at least ``min_height`` pixels."""
    height = source.shape[-2]
    scale = max(1, -(-min_height // height))
    strips = []
    for row in zip(to_uint8(source), to_uint8(edited), to_uint8(target), strict=True):
        gap = np.full((height, 1, 3), 255, dtype=np.uint8)
        strip = np.concatenate([row[0], gap, row[1], gap, row[2]], axis=1)
        strips.append(strip.repeat(scale, axis=0).repeat(scale, axis=1))
    return strips


class EditImageLogger(Callback):
    """Logs ``source | edited | target`` grids of a fixed held-out batch every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: log after every this many optimizer steps (and once at the end of training).
        num_images: pairs in the grid, taken from the first validation batch.
        num_inference_steps: DDIM steps of the edit (few: this runs during training).
        seed: the sampling generator's seed, the same for every grid.
        sampling: further keyword arguments of ``edit`` (``text_guidance``, ``image_guidance``).

    Works for every member of the zoo: it calls the system's ``edit(source, mllm_source, instructions,
    ...)`` and passes ``mllm_source`` only when the batch has one.
        key: the W&B media key.

    Runs on rank 0 only, except under sharded strategies (FSDP, FSDP2) where every rank must take part in
    the forward passes and rank 0 logs. Skipped for stages without a UNet (stage 1). Without a
    :class:`WandbLogger` the grids go to ``<default_root_dir>/edits/step_NNNNNN.png``.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        num_images: int = 4,
        num_inference_steps: int = 10,
        seed: int = 0,
        sampling: dict[str, Any] | None = None,
        key: str = "val/edits",
    ) -> None:
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be at least 1")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.sampling = dict(sampling or {})
        self.key = key
        self._batch: dict[str, Any] | None = None
        self._logged_step = -1

    # ------------------------------------------------------------------------------------- when
    @staticmethod
    def _applies(pl_module: L.LightningModule) -> bool:
        stage = getattr(pl_module, "stage", None)
        return hasattr(pl_module, "edit") and bool(getattr(stage, "use_unet", True))

    @staticmethod
    def _sharded(trainer: L.Trainer) -> bool:
        return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    def _participates(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero or self._sharded(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take the fixed held-out batch (without touching the training RNG)."""
        if not self._applies(pl_module):
            rank_zero_info(f"{type(self).__name__}: this stage has no UNet; no edited images are logged")
            return
        if not self._participates(trainer) or trainer.datamodule is None:
            return
        state = capture_rng_state()
        try:
            batch = next(iter(trainer.datamodule.val_dataloader()))
        finally:
            restore_rng_state(state)
        n = self.num_images
        mllm_source = batch.get("mllm_source")  # only members with an MLLM read it
        self._batch = {
            "source": batch["source"][:n],
            "target": batch["target"][:n],
            "mllm_source": mllm_source[:n] if isinstance(mllm_source, torch.Tensor) else None,
            "instruction": list(batch["instruction"][:n]),
        }

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log a grid when an optimizer step lands on a multiple of ``every_n_steps``."""
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._logged_step:
            self.log_edits(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the final model's edits unless the last step just did."""
        if trainer.global_step != self._logged_step:
            self.log_edits(trainer, pl_module)

    # --------------------------------------------------------------------------------------- what
    @torch.no_grad()
    def log_edits(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Edit the fixed batch with the current weights and log the grid."""
        self._logged_step = trainer.global_step
        if self._batch is None or not self._participates(trainer):
            return
        device = pl_module.device
        batch = self._batch
        mllm_source = batch["mllm_source"]
        modes = {module: module.training for module in pl_module.modules()}
        state = capture_rng_state()
        gather: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if isinstance(trainer.strategy, FSDPStrategy):  # FSDP1: the root's parameters are gathered only in forward
            from torch.distributed.fsdp import FullyShardedDataParallel

            gather = FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
        try:
            pl_module.eval()
            generator = torch.Generator(device=device).manual_seed(self.seed)
            with gather:
                edited = pl_module.edit(  # type: ignore[operator]
                    batch["source"].to(device),
                    None if mllm_source is None else mllm_source.to(device),
                    batch["instruction"],
                    num_inference_steps=self.num_inference_steps,
                    generator=generator,
                    **self.sampling,
                )
        finally:
            for module, training in modes.items():
                module.train(training)
            restore_rng_state(state)
        if trainer.is_global_zero:
            self._write(trainer, triptychs(batch["source"], edited, batch["target"]), batch["instruction"])

    def _write(self, trainer: L.Trainer, strips: list[np.ndarray], captions: list[str]) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        for logger in loggers:
            logger.log_image(key=self.key, images=strips, step=trainer.global_step, caption=captions)
        if not loggers:
            folder = Path(trainer.default_root_dir) / "edits"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate(strips, axis=0)).save(folder / f"step_{trainer.global_step:06d}.png")
