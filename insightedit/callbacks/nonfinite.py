"""Skip optimizer steps whose loss or gradients are NaN/Inf, count them, stop after too many in a row.

A non-finite loss poisons AdamW's moments for good, so such a step must not reach the optimizer. The
guard looks at the loss before backward and at the gradients before the optimizer step (all ranks
agree through one boolean all-reduce, so DDP and FSDP ranks skip together), and when either is
non-finite it drops the gradients: AdamW leaves parameters without a gradient untouched (no update, no
weight decay, no moment change), which is what Lightning itself does when ``training_step`` returns
``None``. The learning-rate schedule still advances by one step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from insightedit.errors import UserError


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: the run stops with one line (exit code 1)."""

    exit_code = 1


class NonFiniteGuard(Callback):
    """Skips and counts non-finite steps (``train/skipped_nonfinite``); stops after ``max_consecutive`` in a row.

    Args:
        max_consecutive: consecutive skipped steps that end the run with :class:`TrainingDiverged`.
        check_gradients: also skip when the loss is finite but a gradient is not (fp16 overflow, bad data).
    """

    def __init__(self, max_consecutive: int = 10, check_gradients: bool = True) -> None:
        if max_consecutive < 1:
            raise ValueError("max_consecutive must be at least 1")
        self.max_consecutive = max_consecutive
        self.check_gradients = check_gradients
        self.skipped = 0
        self.consecutive = 0
        self._loss_finite = True

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Note whether any micro-batch of this optimizer step had a non-finite loss."""
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Drop the gradients of a non-finite step, count it, and stop after too many in a row."""
        finite = self._loss_finite
        self._loss_finite = True
        if finite and self.check_gradients:
            finite = _gradients_finite(optimizer)
        finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            self.consecutive = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive += 1
            rank_zero_warn(
                f"non-finite loss or gradient at step {trainer.global_step}: step skipped "
                f"({self.consecutive} in a row, {self.skipped} in total)"
            )
        pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} consecutive steps had a NaN/Inf loss or gradient "
                f"(last at step {trainer.global_step}); lower the learning rates, check the data, or resume "
                "from an earlier checkpoint"
            )

    def state_dict(self) -> dict[str, Any]:
        """The counters, so a resumed run keeps counting where it stopped."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters."""
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def _gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient this optimizer would apply is finite (one device sync)."""
    flags = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            grad = parameter.grad
            if grad is not None:
                grad = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 shard
                flags.append(torch.isfinite(grad).all())
    return bool(torch.stack(flags).all()) if flags else True
