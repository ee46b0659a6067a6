"""Where the model builders say which weights they loaded: the ``insightedit.loads`` logger, at INFO.

A builder that reads weights from a file, folder or hub id reports one line per load (what, how many
tensors, from where, and what was left out). Nothing is shown unless someone listens: the training
system turns these lines into console lines on rank 0 (:mod:`insightedit.systems.load_reports`); a
library user sees them with ``logging.basicConfig(level=logging.INFO)``.
"""

from __future__ import annotations

import logging
import os

LOADS_LOGGER = "insightedit.loads"

log = logging.getLogger(LOADS_LOGGER)


def report_loaded(setting: str, count: int, source: str | os.PathLike[str], note: str = "") -> None:
    """Report that ``setting`` (``generation.pretrained``) loaded ``count`` tensors from ``source``."""
    log.info("%s: loaded %d tensors from %s%s", setting, count, source, f" ({note})" if note else "")
