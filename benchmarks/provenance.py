"""What every results file records: the command that made it, the git commit it ran at, and the date."""

from __future__ import annotations

import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The commit the code ran at, ``+dirty`` when tracked files had changes; ``unknown`` outside git."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPOSITORY, text=True).strip()
        dirty = subprocess.check_output(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPOSITORY, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def provenance() -> dict[str, str]:
    """``{"command", "commit", "date"}`` of this run (UTC date and time)."""
    command = " ".join(shlex.quote(part) for part in ["python", *sys.argv])
    return {"command": command, "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
