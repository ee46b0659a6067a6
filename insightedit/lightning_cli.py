"""``insightedit fit|validate|test|predict``: Lightning's CLI over any LightningModule and DataModule.

Configs name their classes (``model.class_path``), compose (``--config a.yaml --config b.yaml``) and may
use omegaconf interpolation (``${...}``).
"""

from __future__ import annotations

import warnings

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class InsightEditCLI(LightningCLI):
    """Lightning's CLI with the project's defaults: omegaconf configs, subclass mode for models and data."""


def run_lightning_cli(argv: list[str]) -> int:
    """Run a Lightning subcommand with ``argv`` (``["fit", "--config", ...]``); return the exit code."""
    # the console script passes sys.argv[1:] on as `args`, which Lightning warns about; that is intended
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        InsightEditCLI(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
        )
    except SystemExit as exit_request:  # argument errors and --help end here; keep main() returning codes
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
