"""Answers of ``insightedit plan`` kept by their inputs, so that asking again takes no model build.

A plan is a pure function of the merged config, the command's options, this package's code and the
versions of the libraries that build the model. The key hashes all of them (the package's ``.py`` files
by content) and the config files of local weight folders the config names (a folder's architecture is
what a plan builds), so any change to one recomputes; nothing is imported to make it (no torch). Answers live in
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
WEIGHT_KEYS = (("comprehension", "pretrained"), ("generation", "pretrained"), ("bridging", "clip_pretrained"),
               ("head", "pretrained"))  # fmt: skip


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


def weight_paths(config: dict[str, Any]) -> list[str]:
    """The weight sources a config names (``model.init_args.<section>.<key>``, e.g. a local LLaVA folder)."""
    init_args = ((config.get("model") or {}).get("init_args")) or {}
    overrides = init_args.get("section_overrides")  # an overlay's folders, whichever member reads them
    sources = [init_args, overrides if isinstance(overrides, dict) else {}]
    values = [(source.get(section) or {}).get(key) for source in sources for section, key in WEIGHT_KEYS]
    return sorted({value for value in values if isinstance(value, str) and value})


def local_files_stamp(paths: list[str]) -> list[list[Any]]:
    """Size and modification time of the config-like files of the local weight folders among ``paths``."""
    stamps: list[list[Any]] = []
    for text in paths:
        path = Path(text)
        try:
            if path.is_file():
                files = [path]
            elif path.is_dir():  # the architecture is read from config files at the top or one folder down
                files = sorted(p for p in [*path.glob("*"), *path.glob("*/*")] if p.suffix in CONFIG_SUFFIXES)
            else:
                continue
            for file in files:
                stat = file.stat()
                stamps.append([str(file), stat.st_size, stat.st_mtime_ns])
        except OSError:
            continue
    return stamps


class PlanCache:
    """The stored answer for one set of inputs (``key``: plain JSON data)."""

    def __init__(self, key: dict[str, Any], enabled: bool = True) -> None:
        self.enabled = enabled
        config = key.get("config") if isinstance(key.get("config"), dict) else {}
        stamp = {"code": code_fingerprint(), "files": local_files_stamp(weight_paths(config))} if enabled else {}
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
