"""Weights that name a tiny foundation which is not built yet: one line saying how to build it.

The zoo's tiny configs start from the foundations ``insightedit foundations`` builds (under
``$INSIGHTEDIT_FOUNDATIONS``, else ``checkpoints/tiny/foundations``). Before a model is built, a weight
option naming a path inside a ``foundations`` folder that is not there is reported in one line, instead
of whatever the loader would say about a missing folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from insightedit.errors import UserError

FOUNDATIONS_COMMAND = "insightedit foundations"
FOUNDATIONS_ENV = "INSIGHTEDIT_FOUNDATIONS"
FOUNDATION_OPTIONS: tuple[tuple[str, str], ...] = (
    ("comprehension", "pretrained"),
    ("generation", "pretrained"),
    ("generation", "text_encoder"),
    ("bridging", "clip_pretrained"),
)


def missing_foundations(init_args: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(option, path)`` of each weight option of ``init_args`` naming an absent path in a ``foundations`` folder."""
    missing = []
    for section, key in FOUNDATION_OPTIONS:
        values = init_args.get(section)
        value = values.get(key) if isinstance(values, Mapping) else None
        if isinstance(value, str) and "${" not in value and in_foundations(value) and not Path(value).exists():
            missing.append((f"{section}.{key}", value))
    return missing


def in_foundations(path: str) -> bool:
    """Whether ``path`` is inside a ``foundations`` folder or the ``$INSIGHTEDIT_FOUNDATIONS`` root."""
    root = os.environ.get(FOUNDATIONS_ENV)
    inside_root = bool(root) and Path(path).resolve().is_relative_to(Path(str(root)).resolve())
    return inside_root or "foundations" in Path(path).parts


def check_foundation_paths(init_args: Mapping[str, Any]) -> None:
    """Raise one :class:`UserError` line if a weight option names a tiny foundation that is not built."""
    missing = missing_foundations(init_args)
    if missing:
        option, path = missing[0]
        others = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(
            f"{option}: {path} not found{others}: the tiny foundations are not built here; build them once with "
            f"`{FOUNDATIONS_COMMAND}` (cached; root $INSIGHTEDIT_FOUNDATIONS, else checkpoints/tiny/foundations)"
        )
