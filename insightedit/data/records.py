"""The edit-record schema, its RLE masks, our JSONL manifest, and :func:`load_records` (format detection)."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from insightedit.errors import UserError

log = logging.getLogger(__name__)

TASK_TYPES: tuple[str, ...] = ("remove", "add", "replace")
MANIFEST_NAME = "manifest.jsonl"
REQUIRED_FIELDS: tuple[str, ...] = ("id", "source_id", "source_path", "task_type")
# Instructions longer than this are cut at load (and reported): AdvancedEdit's are under ~300 characters, and a
# 100 kB one would be ~23k MLLM tokens in one training step. The prompt encoder also bounds tokens on its own.
MAX_INSTRUCTION_CHARS = 1000


class RecordError(ValueError):
    """A record whose fields cannot be used; the message is the one-line reason."""


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
    def from_json(cls, data: Any, base: Path) -> EditRecord:
        """Build a record from a manifest line; relative paths resolve against ``base``.

        Raises :class:`RecordError` naming the first field that is missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise RecordError(f"not a record object (a JSON {json_type(data)})")
        for key in REQUIRED_FIELDS:
            if data.get(key) is None or (isinstance(data[key], str) and not data[key].strip()):
                raise RecordError(f"missing required field {key!r}")
            allowed = str | int if key in ("id", "source_id") else str
            if not isinstance(data[key], allowed) or isinstance(data[key], bool):
                raise RecordError(f"field {key!r} is a JSON {json_type(data[key])}, not a string")
        target = data.get("target_path")
        if target is not None and not isinstance(target, str):
            raise RecordError(f"field 'target_path' is a JSON {json_type(target)}, not a string")
        extra = data.get("extra")
        if extra is not None and not isinstance(extra, dict):
            raise RecordError(f"field 'extra' is a JSON {json_type(extra)}, not an object")
        return cls(
            id=str(data["id"]),
            source_id=str(data["source_id"]),
            source_path=base / str(data["source_path"]),
            target_path=None if not target else base / target,
            instructions=instruction_list(data.get("instructions"), "instructions"),
            reasoning_instructions=instruction_list(data.get("reasoning_instructions"), "reasoning_instructions"),
            task_type=str(data["task_type"]),
            target_caption=_text_field(data, "target_caption"),
            bbox=parse_bbox(data.get("bbox")),
            segmentation=data.get("segmentation"),
            class_origin=_text_field(data, "class_origin"),
            class_target=_text_field(data, "class_target"),
            source_caption=_text_field(data, "source_caption"),
            extra=dict(extra or {}),
        )


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``array``, ``string``, ...)."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _text_field(data: dict[str, Any], key: str) -> str:
    """An optional string field ("" when absent or null); raise :class:`RecordError` for other types."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} is a JSON {json_type(value)}, not a string")
    return value


def instruction_list(value: Any, name: str, *, allow_string: bool = False) -> list[str]:
    """The instructions of field ``name`` as a list of stripped, non-blank strings.

    Absent or null is ``[]``. A list must hold only non-blank strings; a string is one instruction only
    with ``allow_string`` (the official layout's single-instruction form; a blank one counts as absent).
    Anything else raises :class:`RecordError`.
    """
    if value is None:
        return []
    if isinstance(value, str):
        if not allow_string:
            raise RecordError(f"invalid instruction: {name!r} is a string, not a list of strings")
        return [value.strip()] if value.strip() else []
    if not isinstance(value, list):
        raise RecordError(f"invalid instruction: {name!r} is a JSON {json_type(value)}, not a list of strings")
    texts: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise RecordError(f"invalid instruction: {name}[{index}] is a JSON {json_type(item)}, not a string")
        if not item.strip():
            raise RecordError(f"empty instruction ({name}[{index}] is blank)")
        texts.append(item.strip())
    return texts


def parse_bbox(value: Any) -> list[float] | None:
    """A COCO ``[x, y, w, h]`` box as floats (``None`` when absent); raise :class:`RecordError` if malformed."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 4:
        size = f"{len(value)} values" if isinstance(value, list) else f"a JSON {json_type(value)}"
        raise RecordError(f"invalid bbox: {size}, not [x, y, w, h]")
    for index, item in enumerate(value):
        if not isinstance(item, int | float) or isinstance(item, bool):
            raise RecordError(f"invalid bbox: bbox[{index}] is a JSON {json_type(item)}, not a number")
        if not math.isfinite(item):
            raise RecordError(f"invalid bbox: bbox[{index}] is {item}, not a finite number")
    if value[2] < 0 or value[3] < 0:
        raise RecordError(f"invalid bbox: negative size {value[2]} x {value[3]}")
    return [float(v) for v in value]


def truncate_instructions(record: EditRecord, limit: int = MAX_INSTRUCTION_CHARS) -> str | None:
    """Cut ``record``'s instructions longer than ``limit`` characters in place; say what was cut, or ``None``."""
    longest = max(map(len, record.instructions + record.reasoning_instructions), default=0)
    if longest <= limit:
        return None
    record.instructions = [text[:limit].rstrip() for text in record.instructions]
    record.reasoning_instructions = [text[:limit].rstrip() for text in record.reasoning_instructions]
    return f"instruction truncated to {limit} characters (was {longest})"


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
    warnings: list[BadRecord] = field(default_factory=list)  # usable records changed at load (lossy), and why

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
    if not record.task_type:
        return "missing task_type"
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


def _decode_line(data: bytes) -> str:
    """A manifest line as text; raise :class:`RecordError` when it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(f"not UTF-8 text (byte 0x{data[error.start]:02x} at column {error.start + 1})") from None


def read_manifest(path: str | Path) -> RecordSet:
    """Read a JSONL manifest; malformed lines and unusable records are skipped with a reason.

    A line that is not UTF-8 or not JSON, not an object, missing a required field, or with a field of the
    wrong type is bad, as is a record failing :func:`check_record_fields`. Of records sharing an id the
    first is kept and the others are bad. Over-long instructions are truncated (a warning).
    """
    path = Path(path)
    try:
        lines = path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n")
    except OSError as error:
        raise UserError(f"cannot read manifest {path}: {error.strerror or error}") from None
    good: list[EditRecord] = []
    bad: list[BadRecord] = []
    warnings: list[BadRecord] = []
    first_seen: dict[str, str] = {}
    for number, data in enumerate(lines, start=1):
        if not data.strip():
            continue
        where = f"{path}:{number}"
        parsed: Any = None
        try:
            text = _decode_line(data)
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as error:
                raise RecordError(f"malformed JSON ({error})") from None
            record = EditRecord.from_json(parsed, path.parent)
        except RecordError as error:
            known = isinstance(parsed, dict) and isinstance(parsed.get("id"), str | int)
            bad.append(BadRecord(f"{where} ({parsed['id']})" if known else where, str(error)))
            continue
        where = f"{where} ({record.id})"
        reason = check_record_fields(record)
        if reason is None and record.id in first_seen:
            reason = f"duplicate id (first at line {first_seen[record.id]})"
        if reason:
            bad.append(BadRecord(where, reason))
            continue
        first_seen[record.id] = str(number)
        note = truncate_instructions(record)
        if note:
            warnings.append(BadRecord(where, note))
        good.append(record)
    return RecordSet(good, bad, path.parent, "manifest", warnings)


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
    if kind == "streaming":
        raise UserError(f"{root} is an optimized streaming dataset; read it with the data module")
    if kind == "manifest":
        record_set = read_manifest(root if root.is_file() else root / MANIFEST_NAME)
    else:
        from insightedit.data.advancededit import load_advancededit

        record_set = load_advancededit(
            root, pipeline=kind == "pipeline", image_root=image_root, target_root=target_root
        )
    if record_set.warnings:
        log.warning("%d records changed at load, e.g. %s", len(record_set.warnings), record_set.warnings[0])
    return record_set
