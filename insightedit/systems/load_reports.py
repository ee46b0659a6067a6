"""Say on the console, once (rank 0), which weights a system loaded while it was built.

The model builders report each load on the ``insightedit.loads`` logger (:mod:`insightedit.models.loads`);
:func:`loads_on_console` forwards those lines to Lightning's console output (``rank_zero_info``) while a
system is built, and keeps them from reaching other handlers twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities import rank_zero_info

from insightedit.models.loads import LOADS_LOGGER


class _ToConsole(logging.Handler):
    """Forward each record's message to ``rank_zero_info``."""

    def emit(self, record: logging.LogRecord) -> None:
        rank_zero_info(record.getMessage())


@contextmanager
def loads_on_console() -> Iterator[None]:
    """While the block runs, every load reported on ``insightedit.loads`` is one console line on rank 0."""
    logger = logging.getLogger(LOADS_LOGGER)
    handler = _ToConsole(logging.INFO)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
