"""The resolved config of every run, beside its checkpoints and in its logger (W&B run config).

LightningCLI's ``SaveConfigCallback`` writes ``config.yaml`` to ``trainer.log_dir`` (for W&B that is
the logger's ``save_dir``). :class:`SaveResolvedConfig` also writes it to every ``ModelCheckpoint``
directory, and logs it as hyperparameters under ``config`` (for W&B:
``run.config["config"]``), so runs can be filtered and compared by any setting. Only ``fit`` writes
``config.yaml``; ``test``, ``validate`` and ``predict`` write ``config-<stage>.yaml``, so evaluating a
checkpoint in its run folder leaves the training run's config as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback


class SaveResolvedConfig(SaveConfigCallback):
    """``SaveConfigCallback`` that also saves beside the checkpoints and logs the config to every logger."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Save once; ``test``/``validate``/``predict`` write ``config-<stage>.yaml``, never the training run's file."""
        name = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn ("fit", "test", ...)
        if name != "fit":
            self.config_filename = f"config-{name}.yaml"
        super().setup(trainer, pl_module, stage)

    def resolved(self) -> dict[str, Any]:
        """The run's full config (every default filled in, interpolation resolved) as plain data."""
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Rank 0: copy ``config.yaml`` into the checkpoint directories and send the config to the loggers."""
        text = self.parser.dump(self.config, skip_none=False)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                directory = Path(callback.dirpath)
                directory.mkdir(parents=True, exist_ok=True)
                (directory / self.config_filename).write_text(text)
        config = yaml.safe_load(text)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})
