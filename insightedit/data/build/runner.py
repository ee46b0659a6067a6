"""Run the steps as Lightning ``predict`` jobs over disjoint shards of the image ids, then write the manifest.

Every step is one ``Trainer.predict`` with the config's ``accelerator``, ``devices``, ``num_nodes`` and
``strategy``, so the same command uses all devices and nodes Lightning is given (``strategy: ddp``
re-runs the command once per device; torchrun and SLURM start the ranks themselves). Rank ``r`` of
``W`` handles the ids ``sorted(ids)[r::W]`` in every step (:func:`shard`: no overlap, no gap, and a
rank only ever needs its own earlier results). Within a batch, API backends handle ``concurrency``
images at once on a thread pool; local models one at a time. Each (image, step) is skipped when done,
skipped when it failed before (unless ``retry_failed``), blocked when the step before it is not done.
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from insightedit.data.advancededit import IMAGE_EXTENSIONS
from insightedit.data.build.chat import StepFailure
from insightedit.data.build.config import STEP_NAMES, BuildConfig
from insightedit.data.build.steps import STEPS, BuildContext, Step
from insightedit.data.build.store import BuildStore, step_label
from insightedit.data.build.summary import finalize
from insightedit.errors import UserError
from insightedit.evaluation.viescore.cache import ReplyCache

log = logging.getLogger(__name__)


def scan_images(folder: str | Path) -> dict[str, Path]:
    """Image files directly in ``folder`` by id (the file name without extension), sorted; raise :class:`UserError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"images folder {folder} does not exist")
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in images:
            raise UserError(f"two images share the id {path.stem!r}: {images[path.stem].name} and {path.name}")
        images[path.stem] = path
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return images


def shard(ids: list[str], rank: int, world_size: int) -> list[str]:
    """The ids rank ``rank`` of ``world_size`` handles: every ``world_size``-th of the sorted ids, from ``rank``."""
    return sorted(ids)[rank::world_size]


def _as_list(batch: list[str]) -> list[str]:
    return list(batch)


class ShardData(L.LightningDataModule):
    """Image ids as predict batches: this rank's :func:`shard`, in order, no distributed sampler."""

    def __init__(self, ids: list[str], batch_size: int) -> None:
        super().__init__()
        self.ids = ids
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``batch_size`` ids of this rank (none: one empty batch, as Lightning needs one)."""
        assert self.trainer is not None, "predict_dataloader runs inside Trainer.predict"
        mine = shard(self.ids, self.trainer.global_rank, self.trainer.world_size)
        batches = [mine[start : start + self.batch_size] for start in range(0, len(mine), self.batch_size)] or [[]]
        return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=_as_list)  # type: ignore[arg-type]


class StepJob(L.LightningModule):
    """A predict job running one step over this rank's image ids; per-image outcomes go to disk."""

    def __init__(self, step: Step, retry_failed: bool) -> None:
        super().__init__()
        self.step = step
        self.store = step.context.store
        self.retry_failed = retry_failed
        self.outcomes: Counter[str] = Counter()

    def on_predict_start(self) -> None:
        """Build the step's backends on this rank's device."""
        self.step.setup(str(self.device))

    def on_predict_end(self) -> None:
        """Free the step's models."""
        self.step.teardown()

    def _one(self, image_id: str) -> str:
        step, store, rank = self.step.number, self.store, self.trainer.global_rank
        if store.is_done(step, image_id):
            return "already done"
        if not self.retry_failed and store.failure(step, image_id) is not None:
            return "failed before"
        if step > 1 and not store.is_done(step - 1, image_id):
            return "blocked"
        store.log(rank, {"step": step, "image_id": image_id, "world_size": self.trainer.world_size})
        start, details = time.perf_counter(), None
        try:
            result = self.step.process(image_id)
        except UserError:
            raise
        except StepFailure as error:
            reason = str(error)
        except Exception as error:  # one bad image never stops the run: recorded with its reason and traceback
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            details = traceback.format_exc()
        else:
            info = {**result.info, "rank": rank, "world_size": self.trainer.world_size,
                    "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
            store.commit(step, image_id, result.files, info)
            return "done"
        store.record_failure(step, image_id, reason, rank, details)
        return "failed"

    def predict_step(self, batch: list[str], batch_idx: int) -> None:
        """Handle a batch of ids, ``concurrency`` at a time."""
        workers = min(self.step.concurrency, len(batch))
        if workers <= 1:
            outcomes = [self._one(image_id) for image_id in batch]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                outcomes = list(pool.map(self._one, batch))
        self.outcomes.update(outcomes)


def make_trainer(config: BuildConfig, out: Path) -> L.Trainer:
    """The predict jobs' trainer (quiet: no logger, checkpoints, progress bar or model summary)."""
    settings = config.trainer
    extra: dict[str, Any] = {"precision": settings.precision} if settings.precision else {}
    try:
        return L.Trainer(
            accelerator=settings.accelerator, devices=settings.devices, num_nodes=settings.num_nodes,
            strategy=settings.strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(out / ".build"), **extra,
        )  # fmt: skip
    except (ValueError, TypeError, RuntimeError) as error:
        raise UserError(f"cannot build the trainer from the config: {(str(error).splitlines() or [''])[0]}") from None


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's per-job chatter for the build, then put the loggers and warning filters back."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*predict_dataloader.*")
        warnings.filterwarnings("ignore", message=".*predict returned None.*")  # outcomes go to disk
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # lightning vs newer torch
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _gather(outcomes: dict[str, Counter[str]]) -> dict[str, Counter[str]]:
    """Sum every rank's per-step outcome counts (when the ranks share a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return outcomes
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, outcomes)
    total: dict[str, Counter[str]] = {}
    for part in gathered:
        for label, counts in part.items():
            total.setdefault(label, Counter()).update(counts)
    return total


def build_dataset(
    config: BuildConfig, images: str | Path, out: str | Path, steps: list[int], retry_failed: bool = False
) -> dict[str, Any] | None:
    """Run ``steps`` over the images; return the summary on global rank 0 (``None`` on the other ranks)."""
    with _quiet():
        return _build(config, images, out, steps, retry_failed)


def _build(
    config: BuildConfig, images: str | Path, out: str | Path, steps: list[int], retry_failed: bool
) -> dict[str, Any] | None:
    out = Path(out)
    image_paths = scan_images(images)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    store = BuildStore(out)
    cache = ReplyCache(Path(config.cache_dir).expanduser() if config.cache_dir else out / ".build" / "cache")
    context = BuildContext(config, store, image_paths, Path(images), cache, retry_failed)
    ids = list(image_paths)
    outcomes: dict[str, Counter[str]] = {}
    rank = 0
    for number in steps:
        trainer = make_trainer(config, out)
        job = StepJob(STEPS[number](context), retry_failed)
        trainer.predict(job, datamodule=ShardData(ids, config.batch_size), return_predictions=False)
        rank = trainer.global_rank
        outcomes[step_label(number)] = job.outcomes
        log.info("step %d %s: %s", number, STEP_NAMES[number], dict(job.outcomes))
    outcomes = _gather(outcomes)  # also a barrier: every rank has finished every step
    if rank != 0:
        return None
    return finalize(store, ids, steps, config, outcomes)
