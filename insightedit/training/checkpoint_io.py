"""Checkpoint files that are either the old one or the new one, never half of either.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
the system temp directory; committing it is ``shutil.move``, a copy when ``/tmp`` is another
filesystem, and nothing is fsynced, so a crash or power loss while saving can leave a truncated
``last.ckpt``. :class:`AtomicCheckpointIO` writes a hidden temporary file in the checkpoint's own
directory, fsyncs it, renames it over the target with ``os.replace`` (atomic on POSIX and Windows
within one filesystem) and fsyncs the directory. Remote (fsspec URL) paths keep Lightning's path.
A save that fails (a full or read-only disk) removes its temporary file and ends the run with one line,
:class:`CheckpointNotWritten`: which checkpoint, why, and that the previous one is intact.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from insightedit.atomic_write import OutputNotWritten, atomic_write, explain, temporary_path

__all__ = ["AtomicCheckpointIO", "CheckpointNotWritten", "atomic_torch_save", "temporary_path"]

log = logging.getLogger(__name__)


class CheckpointNotWritten(OutputNotWritten):
    """A checkpoint could not be saved (disk full, read-only...); the previous file at its path is intact."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` such that ``path`` is never left partially written.

    Raises :class:`CheckpointNotWritten` (an ``OSError`` and a one-line user error) when the file
    cannot be written; whatever was at ``path`` before is then untouched.
    """
    target = Path(path)
    try:
        with atomic_write(target) as handle:
            stream = _KeepWriteError(handle)
            try:
                torch.save(obj, stream)
            except RuntimeError as error:  # torch reports a failed write as "unexpected pos N vs M"
                if stream.error is None:
                    raise
                raise stream.error from error
    except OSError as error:
        raise CheckpointNotWritten(f"could not write checkpoint {target}: {explain(error)}; {_kept(target)}") from error


class _KeepWriteError:
    """The file ``torch.save`` writes to, keeping the ``OSError`` (ENOSPC...) that torch turns into a RuntimeError."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        """Write ``data``; remember the error if the write fails."""
        try:
            return int(self.stream.write(data))
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        """Flush the underlying file."""
        self.stream.flush()


def _kept(target: Path) -> str:
    """What a failed save left as it was: the previous file at ``target``, or the other checkpoints beside it."""
    if target.is_file():
        return f"the previous {target.name} is intact"
    others = sorted(path.name for path in target.parent.glob("*.ckpt") if path.is_file())
    if others:
        return f"the earlier checkpoints there are intact ({', '.join(others)})"
    return "no earlier checkpoint was written there"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: temp file in the same directory + ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (local paths) or as Lightning does (remote URLs)."""
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        log.debug("saving checkpoint atomically to %s", path)
        atomic_torch_save(checkpoint, path)
