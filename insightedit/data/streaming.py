"""Sharded streaming storage with Lightning's ``litdata``: ``data optimize`` writes, the data module reads.

Each record becomes one item: source, target and mask as PNG bytes at a stored size (aligned to the
source frame, EXIF and modes already fixed), plus its text fields. Splits are made by source image
before writing (``OUT/train``, ``OUT/val``, ``OUT/test``). Bad records are skipped while writing and
listed in ``OUT/bad/*.jsonl``. Reading applies the same transform as the map-style dataset.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
from pathlib import Path
from typing import Any

from litdata import StreamingDataLoader, StreamingDataset, optimize
from PIL import Image

from insightedit.data.dataset import split_by_source
from insightedit.data.images import BadSample, load_image
from insightedit.data.records import EditRecord, InvalidMask, load_records
from insightedit.data.samples import SampleBuilder, SampleConfig, collate_samples, load_pair


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _stored_size(size: tuple[int, int], store_size: int | None) -> tuple[int, int]:
    """``size`` scaled so the short side is at most ``store_size`` (never upscaled)."""
    width, height = size
    if not store_size or min(width, height) <= store_size:
        return width, height
    scale = store_size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_record(item: dict[str, Any], base: str, bad_dir: str, store_size: int | None) -> Any:
    """Worker function of ``optimize``: yield the stored item of one record, or log why it is skipped."""
    record = EditRecord.from_json(item, Path(base))
    try:
        source, target, mask = load_pair(record)
    except (BadSample, InvalidMask, OSError, ValueError) as error:
        with open(Path(bad_dir) / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"where": record.id, "reason": str(error)}) + "\n")
        return
    size = _stored_size(source.image.size, store_size)
    yield {
        "record_id": record.id,
        "source_id": record.source_id,
        "task_type": record.task_type,
        "target_caption": record.target_caption,
        "texts": json.dumps([record.instructions, record.reasoning_instructions]),
        "source": _png(source.image.resize(size, Image.Resampling.BICUBIC)),
        "target": _png(target.image.resize(size, Image.Resampling.BICUBIC)),
        "mask": _png(mask.resize(size, Image.Resampling.NEAREST)),
    }


def optimize_dataset(
    root: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    seed: int = 0,
    store_size: int | None = 512,
    num_workers: int = 1,
    chunk_bytes: str = "64MB",
) -> dict[str, Any]:
    """Write ``root`` (any format :func:`load_records` reads) as litdata shards per split under ``out``."""
    out = Path(out)
    record_set = load_records(root)
    bad_dir = out / "bad"
    bad_dir.mkdir(parents=True, exist_ok=True)
    base = Path(root).resolve()
    base = base.parent if base.is_file() else base
    splits = split_by_source(list(record_set), val_fraction, test_fraction, seed)
    written: dict[str, int] = {}
    for name, records in splits.items():
        if not records:
            continue
        inputs = [record.to_json(base) for record in records]
        fn = functools.partial(encode_record, base=str(base), bad_dir=str(bad_dir), store_size=store_size)
        optimize(
            fn=fn, inputs=inputs, output_dir=str((out / name).resolve()), chunk_bytes=chunk_bytes,
            num_workers=max(1, num_workers), mode="overwrite", verbose=False, start_method="fork",
        )  # fmt: skip
        written[name] = len(StreamingDataset(str((out / name).resolve())))
    bad = [str(b) for b in record_set.bad]
    for file in sorted(bad_dir.glob("*.jsonl")):
        bad += [f"{e['where']}: {e['reason']}" for e in map(json.loads, file.read_text().splitlines())]
    return {"written": written, "bad": bad, "total": len(record_set) + len(record_set.bad)}


def _decode(data: bytes, mode: str, name: str) -> Image.Image:
    """A stored PNG by the package's one reader (same rules and limit as files)."""
    return load_image(data, mode=mode, name=name).image


class StreamingEditDataset(StreamingDataset):
    """Samples of the data contract read from ``data optimize`` shards; each rank reads its own chunks."""

    def __init__(self, input_dir: str, config: SampleConfig, shuffle: bool = False, seed: int = 0) -> None:
        super().__init__(input_dir, shuffle=shuffle, seed=seed, drop_last=False)
        self.config = config
        self.builder = SampleBuilder(config)
        self.rng = random.Random(seed)

    def __getitem__(self, index: Any) -> dict[str, Any]:
        """Decode the stored item and build the sample."""
        item = super().__getitem__(index)
        instructions, reasoning = json.loads(item["texts"])
        record = EditRecord(
            id=item["record_id"], source_id=item["source_id"], source_path=Path(), target_path=None,
            instructions=instructions, reasoning_instructions=reasoning, task_type=item["task_type"],
            target_caption=item["target_caption"], bbox=None,
        )  # fmt: skip
        return self.builder.from_images(
            record,
            _decode(item["source"], "RGB", f"{item['record_id']} source"),
            _decode(item["target"], "RGB", f"{item['record_id']} target"),
            _decode(item["mask"], "L", f"{item['record_id']} mask"),
            self.rng,
        )


def streaming_loader(
    dataset: StreamingEditDataset, batch_size: int, num_workers: int, drop_last: bool
) -> StreamingDataLoader:
    """A resumable loader: Lightning saves and restores its ``state_dict`` with the checkpoint."""
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_samples,
        drop_last=drop_last,
    )
