"""Map-style dataset over edit records that never crashes on one bad sample, and the source-image split."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

from torch.utils.data import Dataset

from insightedit.data.checking import reason_kind
from insightedit.data.images import BadSample
from insightedit.data.records import EditRecord
from insightedit.data.samples import SampleBuilder, SampleConfig

log = logging.getLogger(__name__)

# Replacement attempts before a dataset gives up (only when many consecutive records are unusable).
MAX_REPLACEMENTS = 32


def split_by_source(
    records: list[EditRecord], val_fraction: float, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, list[EditRecord]]:
    """Split ``records`` into train/val/test by source image, so no source image is in two splits.

    Source ids are sorted, shuffled with ``seed`` and cut by fraction of *images* (at least one image
    per non-empty held-out split when there are two or more images).
    """
    sources = sorted({record.source_id for record in records})
    random.Random(seed).shuffle(sources)

    def count(fraction: float) -> int:
        if fraction <= 0 or len(sources) < 2:
            return 0
        return min(len(sources) - 1, max(1, round(len(sources) * fraction)))

    n_val, n_test = count(val_fraction), count(test_fraction)
    val, test = set(sources[:n_val]), set(sources[n_val : n_val + n_test])
    splits: dict[str, list[EditRecord]] = {"train": [], "val": [], "test": []}
    for record in records:
        name = "val" if record.source_id in val else "test" if record.source_id in test else "train"
        splits[name].append(record)
    return splits


class EditDataset(Dataset):
    """Samples of the data contract (see :class:`SampleBuilder`) over a list of records.

    A record that fails while loading (truncated file, invalid RLE, ...) is replaced by the next usable
    record; the failure is logged, counted in :attr:`failures` (per process) and in the sample's
    ``load_failures`` field (collated into the batch, so a training step can log it across workers).
    """

    def __init__(self, records: list[EditRecord], config: SampleConfig | None = None, seed: int = 0) -> None:
        if not records:
            raise ValueError("EditDataset needs at least one record")
        self.records = records
        self.config = config or SampleConfig()
        self.seed = seed
        self.builder = SampleBuilder(self.config)
        self.failures: Counter[str] = Counter()
        self.failed: dict[int, str] = {}

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    @staticmethod
    def _rng() -> random.Random:
        # torch seeds ``random`` in every worker (and Lightning's seed_everything in the main process)
        return random.Random(random.getrandbits(64))

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of record ``index``, or of the next usable record when that one fails."""
        failures = 0
        candidate = index
        while failures <= MAX_REPLACEMENTS:
            if candidate not in self.failed:
                try:
                    sample = self.builder(self.records[candidate], self._rng())
                    sample["load_failures"] = failures
                    return sample
                except (BadSample, OSError, ValueError) as error:
                    reason = str(error) if isinstance(error, BadSample) else f"{type(error).__name__}: {error}"
                    self.failed[candidate] = reason
                    self.failures[reason_kind(reason)] += 1
                    log.warning("skipping record %s: %s", self.records[candidate].id, reason)
            failures += 1
            candidate = (candidate + 1) % len(self.records)
        raise RuntimeError(
            f"{MAX_REPLACEMENTS} consecutive records failed to load near index {index}; "
            f"last reasons: {list(self.failed.values())[-3:]}"
        )
