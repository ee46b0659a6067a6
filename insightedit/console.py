"""Library notices that say nothing to a user of this project, silenced narrowly and in one place.

Each entry names the exact message, its category and the module it is attributed to, and says why it
does not apply here; anything else (a real warning, the same category from elsewhere) still shows.
:func:`quiet_library_noise` installs them; the ``insightedit`` command and :mod:`insightedit.pipeline`
call it. Notices fixed at their cause are not here: W&B's ``anonymous``/git-root warnings
(:func:`insightedit.training.run_outputs.prepare_loggers`), the checkpoint-folder warning on a fresh run
(:func:`quiet_fresh_checkpoint_folders`) and the model summary's ``Total FLOPs: 0``
(:class:`insightedit.callbacks.ModelSummaryTable`). Importing this module imports no third-party package.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownWarning:
    """A Python warning silenced by message (regex from its start), category and module (regex)."""

    message: str
    category: type[Warning]
    module: str
    why: str


@dataclass(frozen=True)
class KnownLogRecord:
    """A log record dropped from one logger when its message starts with ``prefix``."""

    logger: str
    prefix: str
    why: str


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        re.escape("`is_gradient_checkpointing` is deprecated and will be removed in v6."),
        FutureWarning,
        r"transformers\.modeling_utils",
        "peft's get_peft_model reads the old name; nothing in this project does",
    ),
    KnownWarning(
        re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
        "Lightning builds torch's deprecated LeafSpec when it flattens the dataloaders",
    ),
    KnownWarning(
        r"Found \d+ module\(s\) in eval mode at the start of training",
        Warning,  # Lightning's PossibleUserWarning (a UserWarning); its class is not imported here
        r"lightning\.pytorch\.loops\.fit_loop",
        "the frozen towers (VAE, text encoder, CLIP image encoder) stay in eval mode by design; "
        "EditorSystem warns instead if a module with trainable parameters is in eval mode",
    ),
    KnownWarning(
        re.escape("predict returned None if it was on purpose"),
        UserWarning,
        r"lightning\.pytorch\.loops\.prediction_loop",
        "predict_step writes each edit to disk and returns nothing, on purpose",
    ),
)

LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")

KNOWN_LOG_RECORDS: tuple[KnownLogRecord, ...] = (
    *(
        KnownLogRecord(name, "💡 Tip: For seamless cloud logging", "an advertisement Lightning prints on every run")
        for name in LIGHTNING_INFO_LOGGERS
    ),
    KnownLogRecord(
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional kernel bitsandbytes would download from the hub; never fetched here",
    ),
    KnownLogRecord(
        "kernels._internals.hf_hub",
        "Skipping publisher trust check for 'kernels-community/",
        "the same optional kernel, looked up offline (kernels >= 0.19 says so before bitsandbytes gives up on it)",
    ),
)


class _DropPrefixes(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Install the filters of :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_RECORDS`; calling again is harmless.

    The warning filters go to the front of :data:`warnings.filters` each call (Python keeps one copy),
    so a ``warnings.catch_warnings`` block that reset them gets them back.
    """
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)
    by_logger: dict[str, list[str]] = {}
    for record in KNOWN_LOG_RECORDS:
        by_logger.setdefault(record.logger, []).append(record.prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropPrefixes) for existing in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))


def quiet_fresh_checkpoint_folders(folders: Iterable[str | Path], resuming: bool = False) -> None:
    """Lightning's "Checkpoint directory ... exists and is not empty" only where it means something.

    The folder of a first run already holds ``config.yaml`` and the W&B run when ``ModelCheckpoint``
    looks at it, and a resumed run (``resuming``) finds its own checkpoints there: neither is news.
    The warning is meant for a new run beside earlier checkpoints (its ``last.ckpt`` would be named
    ``last-v1.ckpt``), and there it still shows.
    """
    for folder in folders:
        path = Path(folder)
        if "://" in str(folder) or (not resuming and any(path.glob("*.ckpt"))):
            continue
        warnings.filterwarnings(
            "ignore",
            message=rf"Checkpoint directory {re.escape(str(folder))} exists and is not empty",
            module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
        )
