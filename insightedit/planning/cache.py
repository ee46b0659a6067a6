"""Answers of ``insightedit plan`` kept by their inputs, so that asking again takes no model build.

A plan is a pure function of the merged config, the command's options, this package's code and the
versions of the libraries that build the model. The key hashes all of them (the package's ``.py`` files
by content), so any change to one recomputes; nothing is imported to make it (no torch). Answers live in
``$INSIGHTEDIT_CACHE`` or ``$XDG_CACHE_HOME/insightedit/plan`` (default ``~/.cache/insightedit/plan``),
one small JSON file each; ``--no-cache`` skips them. A file that cannot be read or written is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import insightedit

LIBRARIES = ("torch", "transformers", "diffusers", "peft", "open_clip_torch", "bitsandbytes")
FORMAT = 1  # bump when the stored answer's layout changes
CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".model")  # what a weights folder's architecture is read from


def cache_dir() -> Path:
    """Where answers are kept."""
    if os.environ.get("INSIGHTEDIT_CACHE"):
        return Path(os.environ["INSIGHTEDIT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "insightedit" / "plan"


def code_fingerprint() -> str:
    """A hash of this package's Python files and the model libraries' versions."""
    digest = hashlib.sha256()
    root = Path(insightedit.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    for library in LIBRARIES:
        try:
            digest.update(f"{library}={metadata.version(library)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{library}=none".encode())
    return digest.hexdigest()


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def local_files_stamp(config: Any) -> list[list[Any]]:
    """Size and modification time of the local files a config names (a folder: its config-like files)."""
    stamps: list[list[Any]] = []
    for text in sorted(set(_strings(config))):
        try:
            path = Path(text)
            if not text or not path.exists():
                continue
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in CONFIG_SUFFIXES)
            for file in files[:200]:
                stat = file.stat()
                stamps.append([str(file), stat.st_size, stat.st_mtime_ns])
        except OSError:
            continue
    return stamps


class PlanCache:
    """The stored answer for one set of inputs (``key``: plain JSON data)."""

    def __init__(self, key: dict[str, Any], enabled: bool = True) -> None:
        self.enabled = enabled
        stamp = {"code": code_fingerprint(), "files": local_files_stamp(key)} if enabled else {}
        text = json.dumps({"format": FORMAT, "key": key} | stamp, sort_keys=True)
        self.path = cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def load(self) -> dict[str, Any] | None:
        """The stored answer, or ``None``."""
        if not self.enabled:
            return None
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def save(self, answer: dict[str, Any]) -> None:
        """Store ``answer`` (written to a temporary file, then renamed: readers never see half a file)."""
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(answer))
            partial.replace(self.path)
        except OSError:
            return


__all__ = ["PlanCache", "cache_dir", "code_fingerprint"]
