"""Write a run's last held-out metrics to a JSON file beside its checkpoints, and print them in one line.

W&B's offline runs keep their summary inside the binary run file; ``insightedit foundations`` (and anyone
comparing runs) reads the held-out numbers from ``<default_root_dir>/held_out.json`` instead:
``{"metric": {"val/loss_diff": ...}, "step": n}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

HELD_OUT_FILE = "held_out.json"


class HeldOutMetrics(Callback):
    """At the end of fit, write the logged metrics that start with ``prefix`` to ``<default_root_dir>/<filename>``.

    Args:
        prefix: which logged metrics are held-out ones (``val/``).
        filename: the file, in the trainer's ``default_root_dir``.
    """

    def __init__(self, prefix: str = "val/", filename: str = HELD_OUT_FILE) -> None:
        self.prefix = prefix
        self.filename = filename

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the file and print ``held-out val/loss_diff 0.0123 at step 1200``; nothing when none was logged."""
        metric = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(self.prefix) and value.numel() == 1
        }
        if not metric:
            return
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"metric": metric, "step": int(trainer.global_step)}, indent=2) + "\n")
        shown = ", ".join(f"{name} {value:.4g}" for name, value in sorted(metric.items()))
        print(f"held-out {shown} at step {trainer.global_step} ({path})")
