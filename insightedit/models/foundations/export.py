"""A foundation's export folder: its weights as ``save_pretrained`` writes them and ``foundation.json``.

``foundation.json`` records what the folder is and how good it is: ``{"kind", "metric", "steps", "commit",
"date", ...}``. The folder is written beside its place and renamed in (:func:`insightedit.atomic_write.atomic_folder`),
so a reader never sees half of one.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from insightedit.atomic_write import atomic_folder

FOUNDATION_FILE = "foundation.json"


def git_commit() -> str:
    """The commit the package's checkout is at (``+dirty`` with tracked changes); ``unknown`` outside git."""
    where = Path(__file__).resolve().parent
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=where, text=True, stderr=subprocess.DEVNULL)
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.strip() + ("+dirty" if dirty.strip() else "")


def write_foundation_export(
    directory: str | Path,
    kind: str,
    save: Callable[[Path], None],
    metric: dict[str, float],
    steps: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory`` whole: ``save(folder)`` puts the weights in, then ``foundation.json``; return it."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(directory) as staging:
        save(staging)
        record = {
            "kind": kind, "metric": metric, "steps": int(steps), "commit": git_commit(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), **(extra or {}),
        }  # fmt: skip
        (staging / FOUNDATION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return directory


__all__ = ["FOUNDATION_FILE", "git_commit", "write_foundation_export"]
