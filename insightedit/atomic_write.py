"""Files and folders that are either the old version or the new one, never half of either.

Everything is first written to a hidden temporary beside the target (same filesystem), flushed and
fsynced, then renamed over the target with ``os.replace`` (atomic on POSIX and Windows within one
filesystem), and the folder is fsynced so the rename survives a power loss. When anything fails the
temporary is removed and the target is untouched: no 0-byte or truncated file is ever left behind.
Outputs are checked before any long work with :func:`check_writable_file` / :func:`check_writable_folder`.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from insightedit.errors import UserError


class OutputNotWritten(UserError, OSError):
    """An output could not be written; the message says which, where and why (one line)."""


def temporary_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (``.<name>.<pid>.<random>.tmp``) for its temporary copy."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def explain(error: BaseException) -> str:
    """Why an OS call failed, in words (``No space left on device (ENOSPC)``)."""
    if isinstance(error, OSError) and error.errno is not None:
        name = errno.errorcode.get(error.errno)
        reason = error.strerror or os.strerror(error.errno)
        return f"{reason} ({name})" if name else reason
    return str(error) or type(error).__name__


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary beside ``path`` for writing; on a clean exit fsync it and rename it over ``path``.

    A file that already exists keeps its permission bits; a new one gets the usual ``0o666 & ~umask``.
    Any exception (``OSError`` for a full or read-only disk) removes the temporary and propagates.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write needs a write mode, got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(target)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, mode, encoding=encoding, newline="" if "b" not in mode else None) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
        except FileNotFoundError:
            pass
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w", encoding=encoding) as stream:
        stream.write(text)


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``path``; on a clean exit it becomes ``path``.

    An existing ``path`` (a folder or a file) is moved aside, the new folder renamed in and the old one
    deleted only then; if the rename fails the old one is put back. On any exception the temporary
    folder is deleted and ``path`` is untouched.
    """
    target = Path(path)
    staging = temporary_path(target)
    staging.mkdir()
    try:
        yield staging
        for directory, _, _ in os.walk(staging, topdown=False):
            fsync_directory(Path(directory))
        old = temporary_path(target) if target.exists() or target.is_symlink() else None
        if old is not None:
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a new ``path`` would be created in)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _folder_problem(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (created first if missing), or ``None`` if they can."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"folder {existing} is not writable"
    return None


def check_writable_folder(folder: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`OutputNotWritten` unless files can be created in ``folder`` (or it can be created)."""
    problem = _folder_problem(Path(folder))
    if problem:
        raise OutputNotWritten(f"cannot write {what} in {folder}: {problem}")


def check_writable_file(path: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`OutputNotWritten` unless ``path`` can be written: not a folder, its folder writable."""
    path = Path(path)
    problem = "it is a folder; give a file name" if path.is_dir() else _folder_problem(path.parent)
    if problem:
        raise OutputNotWritten(f"cannot write {what} {path}: {problem}")
