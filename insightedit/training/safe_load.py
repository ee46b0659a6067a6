"""Reading checkpoints that may come from anyone: tensors and plain data only, never code.

A pickle can name any importable function and have the loader call it, so ``torch.load(weights_only=False)``
of a downloaded ``.ckpt`` runs whatever its author chose. Every checkpoint the project reads goes through
:func:`load_checkpoint` (``torch.load(weights_only=True)``); the project's own checkpoints hold nothing
else. A file that asks for more is refused in one line (:class:`UnsafeCheckpointError`) and its payload
never runs. A distributed-checkpoint folder is checked by :func:`check_distributed_checkpoint` before torch
reads it, because ``torch.distributed.checkpoint`` unpickles its ``.metadata`` with plain :mod:`pickle`.
"""

from __future__ import annotations

import importlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from insightedit.errors import UserError

DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards (plain pickle)
LIGHTNING_META = "meta.pt"  # what Lightning keeps beside the shards (loops, callbacks, hyperparameters)

# what torch's weights-only unpickler says when a file names code it will not call
_REFUSALS = ("GLOBAL", "unrecognized function", "Can only create new object", "Can only build")
_GLOBAL = re.compile(r"GLOBAL (\S+)")
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "Path"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }
)


class UnsafeCheckpointError(UserError):
    """A checkpoint that names code to run while unpickling; refused, never run."""


def _prefix(what: str) -> str:
    return f"{what}: " if what else ""


def refusal(path: str | Path, error: BaseException, what: str = "") -> UnsafeCheckpointError | None:
    """The one-line refusal for the weights-only unpickling ``error`` of ``path``; ``None`` for a merely bad file."""
    text = str(error)
    if not any(marker in text for marker in _REFUSALS):
        return None
    found = _GLOBAL.search(text)
    asked = f"the global {found.group(1)}" if found else "an object that is not a tensor or plain data"
    return UnsafeCheckpointError(
        f"{_prefix(what)}insightedit refuses to unpickle {path}: it asks for {asked}, which could run code "
        "(only tensors and plain data are loaded; nothing was run)"
    )


def _reason(error: BaseException) -> str:
    """The informative line of torch's (multi-line) weights-only error, or the error's type."""
    text = str(error)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", text)
    if match:
        return match.group(1)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}"[:200] if first else type(error).__name__


def checkpoint_error(path: str | Path, error: BaseException, what: str = "") -> UserError:
    """The one-line :class:`UserError` for a failed weights-only load of ``path``: a refusal, or unreadable."""
    return refusal(path, error, what) or UserError(
        f"{_prefix(what)}{path} is not a readable checkpoint ({_reason(error)})"
    )


def load_checkpoint(path: str | Path, what: str = "", map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file needing code, or unreadable, is a one-line :class:`UserError`.

    ``what`` (``"init_from"``, ``"generation.pretrained"``) starts the message.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{_prefix(what)}checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol notice would precede the one-line error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # mmap: a tensor is read when used, so the optimizer states of a full-size last.ckpt (GiBs) that
            # export and init_from never touch stay on disk (the zip format only; older files load whole)
            mmap = zipfile.is_zipfile(path)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - code asked for, truncated zip, bad magic: one line
        raise checkpoint_error(path, error, what) from None


class _MetadataUnpickler(pickle.Unpickler):
    """Plain unpickling restricted to the classes a ``torch.distributed.checkpoint`` index is made of."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global only if it is DCP's own metadata class, a dtype, ``torch.Size`` or a path."""
        allowed = (module, name) in _DCP_ALLOWED
        if module == "torch" and "." not in name:
            allowed = allowed or isinstance(getattr(torch, name, None), torch.dtype)
        if module == _DCP_METADATA_MODULE and "." not in name:
            found = getattr(importlib.import_module(module), name, None)
            allowed = isinstance(found, type) and found.__module__ == module  # defined there, not imported
        if not allowed:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


def check_distributed_checkpoint(folder: str | Path, what: str = "") -> None:
    """Refuse a ``torch.distributed.checkpoint`` folder whose ``.metadata`` or ``meta.pt`` names code.

    Call before handing the folder to torch or Lightning, which unpickle ``.metadata`` without restriction.
    """
    folder = Path(folder)
    index = folder / DCP_METADATA
    if not index.is_file():
        raise UserError(f"{_prefix(what)}{folder} is not a distributed checkpoint (no {DCP_METADATA})")
    try:
        with index.open("rb") as stream:
            _MetadataUnpickler(stream).load()
    except pickle.UnpicklingError as error:
        raise refusal(index, error, what) or UserError(
            f"{_prefix(what)}{index} is not a readable checkpoint index ({_reason(error)})"
        ) from None
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: a user error in one line
        raise UserError(f"{_prefix(what)}{index} is not a readable checkpoint index ({_reason(error)})") from None
    if (folder / LIGHTNING_META).is_file():
        load_checkpoint(folder / LIGHTNING_META, what)
