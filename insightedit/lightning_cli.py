"""``insightedit fit|validate|test|predict``: Lightning's CLI over any LightningModule and DataModule.

Configs name their classes (``model.class_path``), compose (``--config a.yaml --config b.yaml``) and may
use omegaconf interpolation (``${...}``), resolved after the command line is merged (jsonargparse's
``omegaconf+`` mode): ``--trainer.default_root_dir=DIR`` moves the checkpoints and the W&B run that the
configs place at ``${trainer.default_root_dir}``, and ``config.yaml`` records the values really used.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from insightedit.callbacks.progress import StepProgressBar, wants_default_progress_bar
from insightedit.callbacks.summary import ModelSummaryTable
from insightedit.console import quiet_fresh_checkpoint_folders
from insightedit.errors import UserError
from insightedit.hub_weights import check_model_config
from insightedit.training.cli_parser import InsightEditArgumentParser
from insightedit.training.composition import compose_config_args
from insightedit.training.config_saving import SaveResolvedConfig
from insightedit.training.host_memory import suit_heap_to_model
from insightedit.training.run_folder import check_fresh_run_folders
from insightedit.training.run_outputs import check_run_outputs, drop_logger_only_callbacks
from insightedit.training.safe_load import check_distributed_checkpoint, checkpoint_error
from insightedit.training.sharded_loading import deferred_pretrained_loading
from insightedit.training.wandb_setup import prepare_wandb_loggers


class InsightEditCLI(LightningCLI):
    """Lightning's CLI with the project's defaults: omegaconf configs, subclass mode for models and data.

    ``--ckpt_path`` is always read with ``weights_only=True`` (the option ``--weights_only`` is not offered):
    a checkpoint that names code to run is refused in one line, never run.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands, without ``weights_only`` (checkpoints are always loaded weights-only)."""
        return {name: {*skipped, "weights_only"} for name, skipped in LightningCLI.subcommands().items()}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        """``test`` prints its own table, so Lightning's metric table is off (``--verbose=true`` restores it).

        ``fit`` takes ``--overwrite`` (start over in a folder that holds a previous run).
        """
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "test":
            parser.set_defaults(verbose=False)  # the metrics are still logged
        if subcommand == "fit":  # see insightedit.training.run_folder
            parser.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a "
                                "previous run: delete its checkpoints and config.yaml first")
        return parser

    RUN_SETTINGS: tuple[str, ...] = ("evaluation", "prediction")
    """The model's run settings: always the command line's, never a ``--ckpt_path``'s stored ones."""

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``'s hyperparameters (read weights-only) over the command line's model arguments.

        As Lightning does, except: a refused or unreadable file is one line; :attr:`RUN_SETTINGS` are not
        taken (checkpoints written before the system left them out of its hyperparameters hold them, and
        ``insightedit test --ckpt_path X --model.init_args.evaluation.<k>=<v>`` must take effect); a
        checkpoint that names no class (saved by a system built in Python, not by this CLI) is read as
        one of the config's model class. Its ``init_from`` is dropped: the checkpoint holds every weight the
        previous stage gave (the system saves what it trains and what it carried), so the previous stage's
        file is not read again, and testing, predicting or resuming still works once it is moved or deleted.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        try:
            checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)  # only its hparams
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:  # refused or unreadable
            raise checkpoint_error(path, error, "ckpt_path") from None
        skipped = ("_instantiator", *self.RUN_SETTINGS)
        hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k not in skipped}
        if not hparams:
            return
        if hparams.get("init_from"):
            hparams["init_from"] = None
        class_path = hparams.pop("_class_path", None) or self.config.get(f"{subcommand}.model.class_path")
        model = {"class_path": class_path, "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        except SystemExit:
            sys.stderr.write(f"the hyperparameters of --ckpt_path {path} do not fit the config's model\n")
            raise

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """The subcommand's arguments, with ``weights_only=True`` for ``--ckpt_path``."""
        return {**super()._prepare_subcommand_kwargs(subcommand), "weights_only": True}

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; what it refuses once the run is set up is one line.

        A ``--ckpt_path`` (file, folder, ``last``) that names code is refused. Some trainer settings can only
        be checked against the data (``val_check_interval`` larger than an epoch's batches): Lightning raises
        them as a ``MisconfigurationException``, or a ``ValueError`` whose message starts with the setting's
        name in backquotes. Any other error propagates unchanged.
        """
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        path = self.config_init[subcommand].get("ckpt_path")
        if path and Path(path).is_dir():  # torch unpickles a sharded folder's index unrestricted: check it first
            check_distributed_checkpoint(path, "ckpt_path")
        try:
            super()._run_subcommand(subcommand)
        except pickle.UnpicklingError as error:
            resolved = self.trainer.ckpt_path or path  # ``last`` / ``best`` as Lightning resolved them
            raise checkpoint_error(resolved, error, "ckpt_path") from None
        except (MisconfigurationException, ValueError) as error:
            text = " ".join(str(error).split())
            refused_setting = isinstance(error, MisconfigurationException) or text.startswith("`")
            if not refused_setting or os.environ.get("INSIGHTEDIT_DEBUG"):
                raise
            raise UserError(f"Lightning refused a setting of this run: {text}") from error

    def before_instantiate_classes(self) -> None:
        """``fit``/``test``: refuse run folders that cannot be written, before the model and data are built.

        Every subcommand: hub weights the model names that are not here and cannot be downloaded are one line.
        """
        check_model_config((self.config[self.subcommand] if self.subcommand else self.config).get("model"))
        if self.subcommand in ("fit", "test"):
            check_run_outputs(self.config[self.subcommand].get("trainer"))
        if self.subcommand == "fit" and rank_zero_only.rank == 0:  # other ranks start after rank 0 wrote config.yaml
            config = self.config["fit"]
            removed = check_fresh_run_folders(config.get("trainer"), config.get("ckpt_path"), config.get("overwrite"))
            if removed:
                rank_zero_info(f"--overwrite: removed the previous run's {', '.join(map(str, removed))}")

    def after_instantiate_classes(self) -> None:
        """Leave out the callbacks that need a logger when there is none; suit the heap to the model's size.

        Without a logger (``--trainer.logger=false``) the callbacks that need one are dropped with a note; a
        small model's activations come from the padded heap (:func:`suit_heap_to_model`).
        """
        dropped = drop_logger_only_callbacks(self.trainer) if self.subcommand else []
        if dropped:
            rank_zero_info(f"note: no logger (trainer.logger=false): {', '.join(dropped)} left out")
        prepare_wandb_loggers(self.trainer.loggers)  # nothing for W&B to warn about (anonymous, git root)
        checkpoint_folders = [c.dirpath for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        resuming = self.subcommand == "fit" and bool(self.config["fit"].get("ckpt_path"))
        quiet_fresh_checkpoint_folders(checkpoint_folders, resuming)  # warned only beside another run's checkpoints
        suit_heap_to_model(self.model)  # a small model's activations: the padded heap (training/host_memory.py)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer; :class:`StepProgressBar` and :class:`ModelSummaryTable` where Lightning would add its own."""
        config = self._get(self.config_init, "trainer", default={})
        added = []
        if "callbacks" not in kwargs and wants_default_progress_bar(config):
            added.append(StepProgressBar())
        if "enable_model_summary" not in kwargs and config.get("enable_model_summary") is not False:
            if not any(isinstance(c, ModelSummary) for c in _as_list(config.get("callbacks"))):
                added.append(ModelSummaryTable())
                kwargs["enable_model_summary"] = False  # Lightning's own stays out (it is ours now)
        if added:
            kwargs["callbacks"] = [*_as_list(config.get("callbacks")), *added]
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a config that cannot be built is one line, not a traceback.

        Under a ``ModelParallelStrategy`` (FSDP2) the model is built with its loading step deferred: it
        loads in ``configure_model``, after sharding, on rank 0 only (:mod:`insightedit.training.sharded_loading`).
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        try:
            with deferred_pretrained_loading(shards_the_model((config.get("trainer") or {}).get("strategy"))):
                super().instantiate_classes()
        except (ValueError, TypeError, UserError) as error:
            if os.environ.get("INSIGHTEDIT_DEBUG"):
                raise
            raise UserError(f"cannot build what the config describes: {_first_reason(error)}") from error


def shards_the_model(strategy: Any) -> bool:
    """Whether a config's ``trainer.strategy`` (a name, a class path section or an instance) is FSDP2's."""
    import importlib

    from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

    if isinstance(strategy, ModelParallelStrategy):
        return True
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
    if isinstance(class_path, str) and "." in class_path:
        module, _, name = class_path.rpartition(".")
        try:
            kind = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return False  # Lightning says what is wrong with it when it builds the trainer
        return isinstance(kind, type) and issubclass(kind, ModelParallelStrategy)
    if isinstance(strategy, str) and strategy in StrategyRegistry:
        return issubclass(StrategyRegistry[strategy]["strategy"], ModelParallelStrategy)
    return False


def _as_list(value: Any) -> list[Any]:
    """A ``callbacks`` setting as a list (``None``, one callback or a list)."""
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


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
    from insightedit.training.host_memory import return_freed_memory

    return_freed_memory()  # freed gradients and activations leave the resident set (glibc keeps them otherwise)
    # the console script passes sys.argv[1:] on as `args`, which Lightning warns about; that is intended
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # omegaconf+ resolves ${trainer.default_root_dir} from the root of each subcommand's config
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    argv, merged_configs = compose_config_args(argv)
    try:
        InsightEditCLI(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            parser_class=InsightEditArgumentParser,  # no abbreviated options; errors in one line
            parser_kwargs={"parser_mode": "omegaconf+"},  # ${...} resolved after the command line is merged
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
