"""The training progress bar: optimizer steps against the run's total, and plain lines in log files.

Lightning's bars count the batches of the current epoch. A step-limited run (``max_steps``, the
project's configs) then shows ``Epoch 0/-2``, a total that is the epoch's length and an ETA to the end
of the epoch. :class:`StepProgressBar` counts ``trainer.global_step`` against the run's total
(``trainer.estimated_stepping_batches``: ``max_steps``, or fewer when ``max_epochs`` ends the run
first), so its ETA is to the end of the run, and names the epoch without a bogus maximum.

On a terminal it draws Rich's live bar. When the output is not a terminal (``nohup``, SLURM, a pipe),
a live bar writes nothing until the run ends; there it prints one plain line instead, every
``every_n_steps`` steps or ``every_n_seconds`` seconds (whichever comes first), after the first step
and at the last, plus one line per validation::

    step 120/300 (40%) | epoch 0 | 3.71 steps/s | elapsed 0:00:32 | ETA 0:00:48 | train/loss 0.1234
    validation at step 200 | 4 batches in 0:00:03 | val/loss 0.0987

``validate``, ``test`` and ``predict`` print such a line on the same schedule and one when they end.
The ``insightedit`` command adds this bar to every run unless the config names a progress bar or sets
``trainer.enable_progress_bar: false``.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` for a number of seconds (rounded down)."""
    return str(timedelta(seconds=int(max(seconds, 0))))


def _format_value(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def output_is_terminal() -> bool:
    """Whether stdout shows a live display (a terminal or a notebook), as Rich decides it."""
    from rich import get_console

    console = get_console()
    return bool(console.is_terminal or console.is_jupyter)


class StepProgressBar(RichProgressBar):
    """Rich's progress bar counting optimizer steps for step-limited runs; plain lines when not on a terminal.

    Args:
        every_n_steps: in plain mode, print a line at least every this many steps (batches in
            ``validate``/``test``/``predict``); ``None``: by time only.
        every_n_seconds: in plain mode, print a line at least every this many seconds; ``None``: by steps only.
        plain: ``True`` plain lines, ``False`` the live bar, ``None`` (default): plain when stdout is not a terminal.
        refresh_rate, leave, console_kwargs, rich_kwargs: Rich's live bar, as in
            :class:`~lightning.pytorch.callbacks.RichProgressBar`.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_seconds: float | None = 30.0,
        plain: bool | None = None,
        refresh_rate: int = 10,
        leave: bool = False,
        console_kwargs: dict[str, Any] | None = None,
        **rich_kwargs: Any,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1 or None, not {every_n_steps}")
        if every_n_seconds is not None and every_n_seconds <= 0:
            raise ValueError(f"every_n_seconds must be positive or None, not {every_n_seconds}")
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs, **rich_kwargs)
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self._plain = plain
        self._reset_lines()

    def _reset_lines(self) -> None:
        self._started = 0.0  # when the loop started
        self._first_step: tuple[int, float] | None = None  # (step, time) after the loop's first step
        self._last_line: tuple[int, float] | None = None  # (step, time) of the last printed line
        self._validation_started = 0.0

    # -- which mode ----------------------------------------------------------------------------------
    @property
    def plain(self) -> bool:
        """Whether this bar prints plain lines (decided at setup when not given)."""
        return bool(self._plain)

    @property
    def is_enabled(self) -> bool:
        """Rich's live bar runs (never in plain mode)."""
        return super().is_enabled and not self.plain

    @property
    def _prints(self) -> bool:
        return self.plain and self._enabled  # disabled on every rank but 0 by Lightning

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Decide between the live bar and plain lines, once, from where stdout goes."""
        if self._plain is None:
            self._plain = not output_is_terminal()
        super().setup(trainer, pl_module, stage)

    # -- the run's steps ------------------------------------------------------------------------------
    def step_limited(self) -> bool:
        """Whether the run ends at ``max_steps`` rather than at the end of an epoch count."""
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    def total_steps(self) -> float:
        """The optimizer steps the run will take (``inf`` when unknown)."""
        try:
            return float(self.trainer.estimated_stepping_batches)
        except Exception:  # e.g. gradient accumulation that changes with the epoch
            return float("inf")

    def _get_train_description(self, current_epoch: int) -> str:
        """``Epoch N``, with the last epoch only when an epoch count ends the run."""
        max_epochs = self.trainer.max_epochs
        if self.step_limited() or max_epochs is None or max_epochs < 1:
            return f"Epoch {current_epoch}"
        return f"Epoch {current_epoch}/{max_epochs - 1}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Step-limited: one bar over the whole run, carried across epochs; else Lightning's per-epoch bar."""
        if not self.step_limited():
            super().on_train_epoch_start(trainer, pl_module)
            return
        if self.is_disabled or self.progress is None:
            return
        description = self._get_train_description(trainer.current_epoch)
        if self.train_progress_bar_id is None:
            total = self.total_steps()
            self.train_progress_bar_id = self._add_task(int(total) if math.isfinite(total) else total, description)
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)  # a resumed run
        else:
            self.progress.update(self.train_progress_bar_id, description=description)
        self.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Advance the bar (to ``global_step`` when step-limited) or print a line."""
        if self._prints:
            self._maybe_print_step(trainer)
            return
        if not self.step_limited():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:  # resumed mid-epoch
            self.on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    # -- plain lines: training ------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock of the plain lines."""
        super().on_train_start(trainer, pl_module)
        self._reset_lines()
        self._started = time.monotonic()

    def _due(self, count: int, now: float) -> bool:
        if self._last_line is None:
            return True
        last_count, last_time = self._last_line
        if count <= last_count:
            return False
        by_steps = self.every_n_steps is not None and count - last_count >= self.every_n_steps
        by_time = self.every_n_seconds is not None and now - last_time >= self.every_n_seconds
        return by_steps or by_time

    def _maybe_print_step(self, trainer: L.Trainer, force: bool = False) -> None:
        step, now = trainer.global_step, time.monotonic()
        if self._first_step is None:
            self._first_step = (step, now)
        total = self.total_steps()
        if force or step >= total or self._due(step, now):
            if self._last_line is None or step > self._last_line[0]:
                print(self.step_line(trainer, step, total, now), flush=True)
                self._last_line = (step, now)

    def step_line(self, trainer: L.Trainer, step: int, total: float, now: float) -> str:
        """``step 120/300 (40%) | epoch 0 | 3.71 steps/s | elapsed 0:00:32 | ETA 0:00:48 | metrics``."""
        parts = [f"step {step}/{int(total)} ({100 * step / total:.0f}%)" if math.isfinite(total) else f"step {step}"]
        parts.append(f"epoch {trainer.current_epoch}")
        assert self._first_step is not None
        first_step, first_time = self._first_step
        if step > first_step and now > first_time:  # rate and ETA from the steps after the first (no start-up)
            seconds_per_step = (now - first_time) / (step - first_step)
            parts.append(f"{1 / seconds_per_step:.3g} steps/s")
            parts.append(f"elapsed {format_duration(now - self._started)}")
            if math.isfinite(total):
                parts.append(f"ETA {format_duration((total - step) * seconds_per_step)}")
        else:
            parts.append(f"elapsed {format_duration(now - self._started)}")
        metrics = self._metrics_text(trainer, validation=False)
        return " | ".join(parts + ([metrics] if metrics else []))

    def _metrics_text(self, trainer: L.Trainer, validation: bool) -> str:
        """The progress-bar metrics of training (``validation=False``) or of validation (names starting ``val``)."""
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        chosen = {k: v for k, v in metrics.items() if k != "v_num" and k.startswith("val") == validation}
        return ", ".join(f"{name} {_format_value(value)}" for name, value in chosen.items())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Plain mode: the last step's line, if the schedule skipped it."""
        super().on_train_end(trainer, pl_module)
        if self._prints and self._first_step is not None:
            self._maybe_print_step(trainer, force=True)

    # -- plain lines: validation, test, predict -------------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the validation's clock (plain mode)."""
        super().on_validation_start(trainer, pl_module)
        self._validation_started = time.monotonic()
        if trainer.state.fn == "validate":  # `insightedit validate`: lines on the schedule
            self._start_eval()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Plain mode, while fitting: one line with the validation metrics."""
        super().on_validation_end(trainer, pl_module)
        if not self._prints or trainer.sanity_checking:
            return
        batches = trainer.num_val_batches
        count = int(sum(batches) if isinstance(batches, list) else batches)
        seconds = format_duration(time.monotonic() - self._validation_started)
        if trainer.state.fn == "fit":
            line = f"validation at step {trainer.global_step} | {count} batches in {seconds}"
        else:
            line = f"{self.validation_description.lower()} done | {count} batches in {seconds}"
        metrics = self._metrics_text(trainer, validation=True)
        print(" | ".join([line] + ([metrics] if metrics else [])), flush=True)

    def _start_eval(self) -> None:
        self._started = time.monotonic()
        self._last_line = None
        self._first_step = None

    def _maybe_print_batch(self, what: str, done: int, total: float) -> None:
        now = time.monotonic()
        if self._first_step is None:
            self._first_step = (done, now)
        if not (done >= total or self._due(done, now)):
            return
        parts = [f"{what} {done}/{int(total)} batches" if math.isfinite(total) else f"{what} {done} batches"]
        first_done, first_time = self._first_step
        if done > first_done and now > first_time:
            seconds_per_batch = (now - first_time) / (done - first_done)
            parts.append(f"{1 / seconds_per_batch:.3g} batches/s")
            if math.isfinite(total):
                parts.append(f"ETA {format_duration((total - done) * seconds_per_batch)}")
        parts.append(f"elapsed {format_duration(now - self._started)}")
        print(" | ".join(parts), flush=True)
        self._last_line = (done, now)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """``insightedit validate`` in plain mode: a line on the schedule."""
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self._prints and not trainer.sanity_checking and trainer.state.fn == "validate":
            self._current_eval_dataloader_idx = dataloader_idx
            self._maybe_print_batch("validation", batch_idx + 1, self.total_val_batches_current_dataloader)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the test's clock (plain mode)."""
        super().on_test_start(trainer, pl_module)
        self._start_eval()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Plain mode: a line on the schedule."""
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self._prints:
            self._current_eval_dataloader_idx = dataloader_idx
            self._maybe_print_batch("testing", batch_idx + 1, self.total_test_batches_current_dataloader)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the prediction's clock (plain mode)."""
        super().on_predict_start(trainer, pl_module)
        self._start_eval()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Plain mode: a line on the schedule."""
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self._prints:
            self._current_eval_dataloader_idx = dataloader_idx
            self._maybe_print_batch("predicting", batch_idx + 1, self.total_predict_batches_current_dataloader)


def wants_default_progress_bar(trainer_config: Any) -> bool:
    """Whether a ``trainer`` config section leaves the progress bar to Lightning's default.

    True unless it sets ``enable_progress_bar: false`` or names a progress bar among its callbacks.
    """
    from lightning.pytorch.callbacks import ProgressBar

    get = trainer_config.get if hasattr(trainer_config, "get") else lambda key: getattr(trainer_config, key, None)
    if get("enable_progress_bar") is False:
        return False
    callbacks = get("callbacks")
    callbacks = callbacks if isinstance(callbacks, list | tuple) else [callbacks]
    return not any(isinstance(callback, ProgressBar) for callback in callbacks)
