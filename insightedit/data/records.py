"""The edit-record schema, its RLE masks, our JSONL manifest, and :func:`load_records` (format detection)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from insightedit.errors import UserError

TASK_TYPES: tuple[str, ...] = ("remove", "add", "replace")
MANIFEST_NAME = "manifest.jsonl"


class InvalidMask(ValueError):
    """A segmentation that is not a valid COCO RLE for its stated size."""


def _rle_object(segmentation: Any) -> dict[str, Any]:
    """Return a pycocotools-ready RLE dict from a COCO segmentation, or raise :class:`InvalidMask`."""
    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        raise InvalidMask("segmentation is not a COCO RLE {size, counts}")
    size = segmentation["size"]
    if not isinstance(size, list | tuple) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise InvalidMask(f"RLE size {size!r} is not [h, w]")
    height, width = int(size[0]), int(size[1])
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            raise InvalidMask("uncompressed RLE counts do not sum to h*w")
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if not isinstance(counts, str) or not counts:
        raise InvalidMask("RLE counts missing")
    return {"size": [height, width], "counts": counts}


def decode_mask(segmentation: Any, *, validate: bool = True) -> np.ndarray:
    """Decode a COCO RLE to a bool (H, W) array; with ``validate`` reject RLE that does not round-trip.

    pycocotools decodes a truncated compressed string without complaint, so validation re-encodes the
    decoded mask and requires the canonical string back.
    """
    rle = _rle_object(segmentation)
    try:
        decoded = mask_utils.decode(rle)
    except (ValueError, TypeError) as error:
        raise InvalidMask(f"undecodable RLE ({error})") from None
    if validate and isinstance(rle["counts"], str):
        again = mask_utils.encode(np.asfortranarray(decoded))["counts"]
        if again.decode("ascii") != rle["counts"]:
            raise InvalidMask("RLE counts truncated or corrupt (do not round-trip)")
    return decoded.astype(bool)


def rle_area(segmentation: Any) -> int:
    """Area (pixel count) of a COCO RLE, as pycocotools computes it."""
    return int(mask_utils.area(_rle_object(segmentation)))


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a bool (H, W) mask as a JSON-ready COCO RLE ``{size, counts}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class EditRecord:
    """One edit: source image, target image, mask, instructions and captions (AdvancedEdit fields)."""

    id: str
    source_id: str
    source_path: Path
    target_path: Path | None
    instructions: list[str]
    reasoning_instructions: list[str]
    task_type: str
    target_caption: str
    bbox: list[float] | None
    segmentation: dict[str, Any] | None = None
    class_origin: str = ""
    class_target: str = ""
    source_caption: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def mask(self) -> np.ndarray:
        """Decode the record's RLE to a bool (H, W) array at the RLE's own size."""
        if self.segmentation is None:
            raise InvalidMask(f"record {self.id} has no segmentation")
        return decode_mask(self.segmentation, validate=False)

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The record as a manifest line; paths relative to ``relative_to`` where they lie under it."""

        def rel(path: Path | None) -> str | None:
            if path is None:
                return None
            if relative_to is not None:
                try:
                    return str(Path(path).resolve().relative_to(relative_to.resolve()))
                except ValueError:
                    pass
            return str(path)

        return {
            "id": self.id,
            "source_id": self.source_id,
            "source_path": rel(self.source_path),
            "target_path": rel(self.target_path),
            "instructions": self.instructions,
            "reasoning_instructions": self.reasoning_instructions,
            "task_type": self.task_type,
            "target_caption": self.target_caption,
            "source_caption": self.source_caption,
            "bbox": self.bbox,
            "segmentation": self.segmentation,
            "class_origin": self.class_origin,
            "class_target": self.class_target,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], base: Path) -> EditRecord:
        """Build a record from a manifest line; relative paths resolve against ``base``."""
        target = data.get("target_path")
        return cls(
            id=str(data["id"]),
            source_id=str(data["source_id"]),
            source_path=base / str(data["source_path"]),
            target_path=None if not target else base / str(target),
            instructions=[str(s) for s in data.get("instructions") or []],
            reasoning_instructions=[str(s) for s in data.get("reasoning_instructions") or []],
            task_type=str(data["task_type"]),
            target_caption=str(data.get("target_caption") or ""),
            bbox=data.get("bbox"),
            segmentation=data.get("segmentation"),
            class_origin=str(data.get("class_origin") or ""),
            class_target=str(data.get("class_target") or ""),
            source_caption=str(data.get("source_caption") or ""),
            extra=dict(data.get("extra") or {}),
        )


@dataclass(frozen=True)
class BadRecord:
    """A record (or a whole file) that was skipped, and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        """``where: reason`` on one line."""
        return f"{self.where}: {self.reason}"


@dataclass
class RecordSet:
    """Loaded records plus the ones skipped with their reasons; iterates over the good records."""

    records: list[EditRecord]
    bad: list[BadRecord] = field(default_factory=list)
    root: Path | None = None
    format: str = ""

    def __iter__(self) -> Iterator[EditRecord]:
        """Iterate over good records."""
        return iter(self.records)

    def __len__(self) -> int:
        """Number of good records."""
        return len(self.records)

    def __getitem__(self, index: int) -> EditRecord:
        """The ``index``-th good record."""
        return self.records[index]

    def task_counts(self) -> dict[str, int]:
        """Good records per task type."""
        counts = Counter(record.task_type for record in self.records)
        return {task: counts.get(task, 0) for task in TASK_TYPES}


def check_record_fields(record: EditRecord) -> str | None:
    """Return why ``record`` is unusable from its fields alone (no file access), or ``None`` if fine."""
    if record.task_type not in TASK_TYPES:
        return f"unknown task_type {record.task_type!r}"
    if not record.instructions and not record.reasoning_instructions:
        return "empty instruction"
    if record.segmentation is None:
        return "no segmentation"
    try:
        _rle_object(record.segmentation)
    except InvalidMask as error:
        return f"invalid RLE: {error}"
    return None


def write_manifest(records: list[EditRecord], path: str | Path) -> Path:
    """Write ``records`` as our JSONL manifest at ``path`` (paths relative to its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(path.parent), sort_keys=True) + "\n")
    return path


def read_manifest(path: str | Path) -> RecordSet:
    """Read a JSONL manifest; malformed lines and unusable records are skipped with a reason."""
    path = Path(path)
    good: list[EditRecord] = []
    bad: list[BadRecord] = []
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = EditRecord.from_json(json.loads(line), path.parent)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                bad.append(BadRecord(where, f"malformed manifest line ({error})"))
                continue
            reason = check_record_fields(record)
            if reason:
                bad.append(BadRecord(f"{where} ({record.id})", reason))
            else:
                good.append(record)
    return RecordSet(good, bad, path.parent, "manifest")


def detect_format(root: Path) -> str:
    """Name the format stored at ``root``: ``manifest``, ``pipeline``, ``json`` or ``streaming``."""
    if root.is_file():
        if root.suffix == ".jsonl":
            return "manifest"
        if root.suffix == ".json":
            return "json"
        raise UserError(f"{root} is neither a .jsonl manifest nor a .json record file")
    if (root / MANIFEST_NAME).is_file():
        return "manifest"
    if any((root / split / "index.json").is_file() for split in ("train", "val", "test")):
        return "streaming"
    from insightedit.data.advancededit import is_pipeline_root

    if is_pipeline_root(root):
        return "pipeline"
    if next(root.rglob("*.json"), None) is not None:
        return "json"
    raise UserError(f"{root} holds no AdvancedEdit records (no manifest.jsonl, pipeline folders or .json)")


def load_records(
    root: str | Path, image_root: str | Path | None = None, target_root: str | Path | None = None
) -> RecordSet:
    """Load edit records from ``root``, detecting its format (AdvancedEdit JSON dir or pipeline, JSONL).

    ``image_root`` / ``target_root`` name where blank source / target paths resolve; by default the
    naming rule of :mod:`insightedit.data.advancededit` looks beside the JSON files.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"dataset root {root} does not exist")
    kind = detect_format(root)
    if kind == "manifest":
        return read_manifest(root if root.is_file() else root / MANIFEST_NAME)
    if kind == "streaming":
        raise UserError(f"{root} is an optimized streaming dataset; read it with the data module")
    from insightedit.data.advancededit import load_advancededit

    return load_advancededit(root, pipeline=kind == "pipeline", image_root=image_root, target_root=target_root)
