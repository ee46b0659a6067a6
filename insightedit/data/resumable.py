"""A training loader that a checkpoint can resume mid-epoch, batch for batch, on one process or many.

Three things make a resumed run see exactly the batches an uninterrupted one would:

- the order: :class:`ResumableSampler` is a ``DistributedSampler`` (so Lightning keeps it under DDP and
  calls ``set_epoch``), shuffled from ``seed + epoch`` alone, never from the global RNG;
- each sample's randomness (instruction phrasing, augmentation): :class:`SeededDataset` seeds Python's
  ``random`` (which the dataset draws from) from ``(seed, epoch, index)`` around every item and restores
  the caller's state afterwards, so it holds in worker processes and after a restart alike;
- the position: :class:`ResumableDataLoader` counts the batches it has handed out this epoch; Lightning
  saves its ``state_dict`` with the checkpoint and the next ``iter`` skips them without loading them.

Lightning does not prefetch from a loader that has a length, so "handed out" is "trained on".
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index`` in ``epoch``: independent of order, rank, worker and restarts."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ResumableSampler(DistributedSampler):
    """Shuffles by ``seed + epoch``, yields ``(index, item seed)`` and can start part-way through an epoch."""

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True) -> None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0  # items of this rank to skip at the next iteration (set by the loader on resume)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        """The ``(index, item seed)`` pairs of this rank for the current epoch, after the first ``start``."""
        indices = list(super().__iter__())[self.start :]
        self.start = 0
        return iter([(index, sample_seed(self.seed, self.epoch, index)) for index in indices])


class SeededDataset(Dataset):
    """Wraps a map-style dataset: item ``(index, seed)`` is ``dataset[index]`` with ``random`` seeded by ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        """Length of the wrapped dataset."""
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        """The wrapped item, drawn with ``random`` seeded from ``key``; the caller's ``random`` state is kept."""
        index, seed = key
        state = random.getstate()
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(state)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose ``state_dict`` is its position in the epoch; Lightning saves and restores it."""

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.batches_seen = 0
        self._resume_at = 0
        self._resume_epoch = -1

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        """Batches of the current epoch, after any that a restored checkpoint had already trained on."""
        sampler = self.sampler
        skip, self._resume_at = self._resume_at, 0
        if skip and getattr(sampler, "epoch", 0) != self._resume_epoch:
            skip = 0  # the checkpoint ended its epoch (e.g. at limit_train_batches); this is a fresh one
        if skip:
            if not isinstance(sampler, ResumableSampler):
                raise RuntimeError("a ResumableDataLoader resumes only with a ResumableSampler")
            sampler.start = skip * int(self.batch_size or 1)
        self.batches_seen = skip
        for batch in super().__iter__():
            self.batches_seen += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its batches this loader has handed out."""
        epoch = int(getattr(self.sampler, "epoch", 0))
        return {"epoch": epoch, "batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next iteration after ``batches_seen`` batches (the epoch comes from Lightning's ``set_epoch``)."""
        self._resume_at = int(state.get("batches_seen", 0))
        self._resume_epoch = int(state.get("epoch", 0))
        if self._resume_at >= len(self):  # the checkpoint was taken at the epoch's last batch
            self._resume_at = 0


def make_resumable(loader: DataLoader, seed: int) -> ResumableDataLoader:
    """The same loader (batch size, workers, collate, drop_last) made resumable and seeded by ``seed``."""
    return ResumableDataLoader(
        SeededDataset(loader.dataset),
        batch_size=loader.batch_size,
        sampler=ResumableSampler(loader.dataset, seed=seed, shuffle=True),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        persistent_workers=loader.persistent_workers,
    )
