"""Checks of ``fit|validate|test|predict``'s arguments that answer before Lightning and the models are imported.

Building Lightning's parser needs torch, Lightning and every model class (tens of seconds on a busy
machine). Two mistakes are common enough to catch first, in a fraction of a second:

- an unknown or abbreviated ``--trainer.*`` option (``--trainer.max_step=5``), checked against
  :data:`TRAINER_ARGUMENTS` (``lightning.pytorch.Trainer``'s arguments; a test keeps the list equal to
  the installed Lightning's), with a "did you mean";
- hub weights the configs name that are not on this machine and cannot be downloaded
  (:mod:`insightedit.hub_weights`).

Both are best-effort and never stricter than the parser: what they cannot read for certain (an
interpolated value, a whole section given on the command line) is left to the checks after parsing.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from insightedit.errors import UserError

# inspect.signature(lightning.pytorch.Trainer), in order (tests/test_cli_errors.py keeps it up to date)
TRAINER_ARGUMENTS: tuple[str, ...] = (
    "accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches",
    "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches",
    "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps",
    "enable_checkpointing", "enable_progress_bar", "enable_model_summary", "accumulate_grad_batches",
    "gradient_clip_val", "gradient_clip_algorithm", "deterministic", "benchmark", "inference_mode",
    "use_distributed_sampler", "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm",
    "reload_dataloaders_every_n_epochs", "default_root_dir", "enable_autolog_hparams", "model_registry",
)  # fmt: skip
SECTIONS = ("comprehension", "generation", "bridging")
WEIGHT_OPTIONS = {("comprehension", "pretrained"), ("generation", "pretrained"), ("bridging", "clip_pretrained")}


def unknown_option(prefix: str, name: str, known: list[str] | tuple[str, ...]) -> UserError:
    """``unknown option PREFIXNAME; did you mean PREFIXCLOSEST?`` (the suggestion only when a name is close)."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return UserError(f"unknown option {prefix}{name}{hint}")


def check_trainer_options(argv: list[str]) -> None:
    """Refuse an unknown (or abbreviated) ``--trainer.NAME`` option in one line, with the closest name."""
    for token in argv:
        if token == "--":
            return
        if not token.startswith("--trainer."):
            continue
        option = token.split("=", 1)[0]
        name = option[len("--trainer.") :].split(".", 1)[0].rstrip("+")  # --trainer.callbacks+=...: append
        if name not in TRAINER_ARGUMENTS:
            raise unknown_option("--trainer.", name, TRAINER_ARGUMENTS)


def option_values(argv: list[str]) -> list[tuple[str, str | None]]:
    """(``--option``, value) pairs of ``argv`` (value ``None`` for a flag with no value)."""
    pairs: list[tuple[str, str | None]] = []
    for index, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        if "=" in token:
            option, value = token.split("=", 1)
            pairs.append((option, value))
        else:
            following = argv[index + 1] if index + 1 < len(argv) else None
            pairs.append((token, None if following is None or following.startswith("--") else following))
    return pairs


def configured_model(argv: list[str]) -> dict[str, Any] | None:
    """The ``model.init_args`` the configs and command line give, where they can be read for certain; else ``None``.

    ``None`` for: no ``--config``, a config that is missing or not plain yaml (the parser says so), or a
    command line that replaces the model, a whole section or a weight option in a form not read here.
    """
    from insightedit.training.composition import merge_config_files

    pairs = option_values(argv)
    if any(option in ("-h", "--help", "--print_config") for option, _ in pairs) or "-h" in argv:
        return None
    paths = [value for option, value in pairs if option == "--config" and value]
    if not paths or not all(Path(path).is_file() for path in paths):
        return None
    try:
        model = merge_config_files(paths).get("model")
    except UserError:
        return None
    if not isinstance(model, dict) or not str(model.get("class_path", "")).endswith("EditorSystem"):
        return None
    init_args = dict(model.get("init_args") or {})
    for option, value in pairs:
        if not option.startswith("--model"):
            continue
        parts = option[2:].split(".")[1:]
        parts = parts[1:] if parts[:1] == ["init_args"] else parts
        whole = len(parts) == 1 and parts[0] in ("class_path", "init_args", "member", *SECTIONS)
        whole = whole or parts[:1] == ["section_overrides"]  # what wins over the sections: left to the parser
        if not parts or whole:
            return None  # the model, its member or a whole section replaced: leave it to the parser
        if tuple(parts) in WEIGHT_OPTIONS:
            if value is None:
                return None
            section = dict(init_args.get(parts[0]) or {})
            section[parts[1]] = None if value in ("null", "None") else value
            init_args[parts[0]] = section
        elif parts == ["preset"]:
            init_args["preset"] = value
    return init_args


def check_configured_weights(argv: list[str]) -> None:
    """Refuse, in one line, hub weights the configs name that are not here and cannot be downloaded."""
    init_args = configured_model(argv)
    if init_args is None:
        return
    from insightedit.hub_weights import check_hub_weights, configured_hub_weights

    check_hub_weights(configured_hub_weights(init_args, known_only=True))


def precheck(argv: list[str]) -> None:
    """Every check above, for ``argv`` after the subcommand name (``["--config", "stage3.yaml", ...]``)."""
    check_trainer_options(argv)
    check_configured_weights(argv)
