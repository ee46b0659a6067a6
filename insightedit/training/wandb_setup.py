"""W&B loggers made ready before their run starts, so W&B has nothing to warn about.

* Lightning's ``WandbLogger`` passes ``anonymous=None`` to ``wandb.init`` whenever ``anonymous`` is
  not set; recent wandb warns for any value given ("The anonymous setting has no effect"). The
  unset value is dropped here, so wandb sees no setting at all.
* wandb looks for a git repository from its ``dir`` (the logger's ``save_dir``); on a first run that
  folder does not exist yet and wandb warns "git root ... does not exist". It is created here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def prepare_wandb_loggers(loggers: Iterable[Any]) -> None:
    """For every W&B logger whose run has not started: no ``anonymous=None``, and its ``save_dir`` exists."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger) or getattr(logger, "_experiment", None) is not None:
            continue
        init = getattr(logger, "_wandb_init", None)
        if not isinstance(init, dict):
            continue
        if "anonymous" in init and init["anonymous"] is None:
            del init["anonymous"]
        save_dir = init.get("dir")
        if save_dir and "://" not in str(save_dir):
            Path(save_dir).mkdir(parents=True, exist_ok=True)
