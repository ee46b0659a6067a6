"""``insightedit fit|validate|test|predict``: Lightning's CLI over any LightningModule and DataModule.

Configs name their classes (``model.class_path``), compose (``--config a.yaml --config b.yaml``) and may
use omegaconf interpolation (``${...}``).
"""

from __future__ import annotations

import os
import warnings

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from insightedit.errors import UserError
from insightedit.training.composition import compose_config_args
from insightedit.training.config_saving import SaveResolvedConfig


class InsightEditCLI(LightningCLI):
    """Lightning's CLI with the project's defaults: omegaconf configs, subclass mode for models and data."""

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a config that cannot be built is one line, not a traceback."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, UserError) as error:
            if os.environ.get("INSIGHTEDIT_DEBUG"):
                raise
            raise UserError(f"cannot build what the config describes: {_first_reason(error)}") from error


def _first_reason(error: Exception) -> str:
    """The most specific line of jsonargparse's nested 'Does not validate against any of ...' report."""
    reasons = [
        line.strip()[2:]
        for line in str(error).splitlines()
        if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line
    ]
    return reasons[0] if reasons else str(error).splitlines()[0]


def run_lightning_cli(argv: list[str]) -> int:
    """Run a Lightning subcommand with ``argv`` (``["fit", "--config", ...]``); return the exit code."""
    # the console script passes sys.argv[1:] on as `args`, which Lightning warns about; that is intended
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    argv, merged_configs = compose_config_args(argv)
    try:
        InsightEditCLI(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_callback=SaveResolvedConfig,
            save_config_kwargs={"overwrite": True},
        )
    except SystemExit as exit_request:  # argument errors and --help end here; keep main() returning codes
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        for path in merged_configs:
            path.unlink(missing_ok=True)
    return 0
