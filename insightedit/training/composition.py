"""Configs that compose: ``--config stage3.yaml --config fsdp_8gpu.yaml`` deep-merges the files.

jsonargparse merges successive ``--config`` files key by key for class arguments but *replaces* any
argument typed as a dict: an overlay that sets ``model.init_args.comprehension.quantization`` would
drop every other comprehension setting of the stage. So consecutive ``--config`` files are merged
here first (mappings deep-merged, lists and scalars replaced, later files win; a section that names
another ``class_path`` is replaced whole), written to one temporary yaml, and handed to Lightning's
parser as a single ``--config``; omegaconf interpolation
(``${trainer.default_root_dir}``) is then resolved over the merged whole and the command line
(jsonargparse's ``omegaconf+`` mode), so an overlay may refer to a stage's values and
``--trainer.default_root_dir=DIR`` moves what the files place there. ``insightedit plan`` merges the same way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from insightedit.errors import UserError


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` on top of ``base``: mappings merge key by key, anything else is replaced.

    A mapping naming a different ``class_path`` replaces the old one whole (its ``init_args`` belong
    to another class), as jsonargparse does.
    """
    if isinstance(base, dict) and isinstance(override, dict):
        if "class_path" in override and override["class_path"] != base.get("class_path"):
            return override
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    return override


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A yaml config file as a mapping (a one-line :class:`UserError` if it is missing or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config {path} is not valid yaml: {str(error).splitlines()[0]}") from error
    if not isinstance(loaded, dict):
        raise UserError(f"config {path} must be a mapping at the top level")
    return loaded


def merge_config_files(paths: list[str]) -> dict[str, Any]:
    """The files deep-merged left to right (interpolation left unresolved)."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = deep_merge(merged, load_yaml(path))
    return merged


def _config_runs(argv: list[str]) -> list[tuple[int, int, list[str]]]:
    """(start, end, paths) of each run of two or more consecutive ``--config`` arguments."""
    runs: list[tuple[int, int, list[str]]] = []
    i, n = 0, len(argv)
    while i < n:
        start, paths = i, []
        while i < n:
            if argv[i] == "--config" and i + 1 < n:
                paths.append(argv[i + 1])
                i += 2
            elif argv[i].startswith("--config="):
                paths.append(argv[i].split("=", 1)[1])
                i += 1
            else:
                break
        if len(paths) > 1:
            runs.append((start, i, paths))
        i = i + 1 if i == start else i
    return runs


def compose_config_args(argv: list[str]) -> tuple[list[str], list[Path]]:
    """``argv`` with each run of consecutive ``--config`` files replaced by one merged temporary file.

    Returns the new arguments and the temporary files (the caller deletes them when the run ends).
    """
    out = list(argv)
    temporary: list[Path] = []
    for start, end, paths in reversed(_config_runs(argv)):
        merged = merge_config_files(paths)
        handle, name = tempfile.mkstemp(prefix="insightedit-config-", suffix=".yaml")
        with os.fdopen(handle, "w") as stream:
            stream.write(f"# merged from: {' + '.join(paths)}\n")
            yaml.safe_dump(merged, stream, sort_keys=False)
        temporary.append(Path(name))
        out[start:end] = ["--config", name]
    return out, temporary
