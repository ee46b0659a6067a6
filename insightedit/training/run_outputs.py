"""Where a Lightning run writes, checked before anything is built; callbacks that need a logger when none is set.

A run writes to ``trainer.default_root_dir`` (logs, ``config.yaml``, edited-image grids), to every
``ModelCheckpoint``'s ``dirpath`` and to each logger's ``save_dir``. :func:`check_run_outputs` reads these
from the parsed config and refuses a folder that cannot be written (a path under a file, a read-only
folder) with one line naming the setting, before the model or the data are built. Remote URLs are
left to their filesystem.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor

from insightedit.atomic_write import check_writable_folder

NEEDS_A_LOGGER: tuple[type[Callback], ...] = (LearningRateMonitor,)  # raise at train start without a logger


def _get(node: Any, key: str) -> Any:
    """``node[key]`` for a dict or a jsonargparse ``Namespace``; ``None`` when absent."""
    if isinstance(node, Mapping):
        return node.get(key)
    return getattr(node, key, None)


def _as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def run_output_folders(trainer: Any) -> Iterator[tuple[str, str]]:
    """``(setting, folder)`` for every local folder the ``trainer`` section of a config writes to."""
    root = _get(trainer, "default_root_dir")
    yield "trainer.default_root_dir", str(root) if root else os.getcwd()
    for callback in _as_list(_get(trainer, "callbacks")):
        class_path = str(_get(callback, "class_path") or "")
        dirpath = _get(_get(callback, "init_args"), "dirpath")
        if class_path.endswith("ModelCheckpoint") and dirpath:
            yield f"{class_path.rsplit('.', 1)[-1]}.dirpath", str(dirpath)
    for logger in _as_list(_get(trainer, "logger")):
        save_dir = _get(_get(logger, "init_args"), "save_dir")
        if save_dir:
            yield f"{str(_get(logger, 'class_path')).rsplit('.', 1)[-1]}.save_dir", str(save_dir)


def check_run_outputs(trainer: Any) -> None:
    """Raise :class:`~insightedit.atomic_write.OutputNotWritten` for the first run folder that cannot be written."""
    for setting, folder in run_output_folders(trainer):
        if "://" not in folder:
            check_writable_folder(folder, f"the run's files ({setting})")


def drop_logger_only_callbacks(trainer: Trainer) -> list[str]:
    """Without any logger, remove the callbacks that need one; return their class names (for a note)."""
    if trainer.loggers:
        return []
    dropped = [type(callback).__name__ for callback in trainer.callbacks if isinstance(callback, NEEDS_A_LOGGER)]
    trainer.callbacks = [callback for callback in trainer.callbacks if not isinstance(callback, NEEDS_A_LOGGER)]
    return dropped
