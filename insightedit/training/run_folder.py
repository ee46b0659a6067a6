"""A fresh ``fit`` never lands on a previous run: it refuses a run folder that already holds one.

Lightning would write the new run's ``last.ckpt`` as ``last-v1.ckpt`` beside the old one (so a command
reading ``last.ckpt`` silently gets the old model) and overwrite the old ``config.yaml``.
:func:`check_fresh_run_folders` refuses such a run, before the model or the data are built, in one line
naming the folder and the three ways out: resume (``--ckpt_path last``), start over (``--overwrite``,
which deletes the previous run's checkpoints and ``config.yaml``), or train elsewhere
(``--trainer.default_root_dir=DIR``). A run that resumes from a checkpoint inside its own folder is not
fresh and is let through.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from insightedit.errors import UserError
from insightedit.training.run_outputs import run_output_folders

CONFIG_FILE = "config.yaml"  # what SaveConfigCallback writes for fit
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")  # Lightning's names for a checkpoint of this run


def previous_run_files(trainer: Any) -> list[Path]:
    """The checkpoints (``*.ckpt`` files or sharded folders) and ``config.yaml`` already in the run's folders.

    ``trainer`` is the parsed ``trainer`` section of a config (a mapping or a jsonargparse ``Namespace``);
    the folders are ``default_root_dir``, every ``ModelCheckpoint.dirpath`` and every logger's ``save_dir``.
    """
    found: list[Path] = []
    for _, name in run_output_folders(trainer):
        folder = Path(name)
        if "://" in name or not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if (entry.suffix == ".ckpt" or entry.name == CONFIG_FILE) and entry not in found:
                found.append(entry)
    return found


def _checkpoint_folders(trainer: Any) -> list[Path]:
    return [Path(folder).resolve() for setting, folder in run_output_folders(trainer) if setting.endswith("dirpath")]


def resumes_this_run(trainer: Any, ckpt_path: str | None) -> bool:
    """Whether ``ckpt_path`` continues the run in these folders (``last``, or a checkpoint inside them)."""
    if not ckpt_path:
        return False
    if ckpt_path in SPECIAL_CKPT_PATHS:
        return True
    path = Path(ckpt_path).resolve()
    return any(path.is_relative_to(folder) for folder in _checkpoint_folders(trainer))


def check_fresh_run_folders(trainer: Any, ckpt_path: str | None, overwrite: bool) -> list[Path]:
    """Refuse a fresh ``fit`` into folders holding a previous run; with ``overwrite``, delete that run instead.

    Returns the paths deleted (empty unless ``overwrite``). Raises :class:`UserError` in one line otherwise.
    """
    if resumes_this_run(trainer, ckpt_path):
        return []
    found = previous_run_files(trainer)
    if not found:
        return []
    if overwrite:
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return found
    folder = found[0].parent
    names = [path.name for path in found if path.parent == folder]
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise UserError(
        f"{folder} already holds a run ({listed}): resume it with --ckpt_path last, start over with --overwrite "
        "(deletes its checkpoints and config.yaml), or train in another folder with --trainer.default_root_dir=DIR"
    )
