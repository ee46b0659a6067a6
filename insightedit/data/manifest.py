"""What ``insightedit predict`` edits: a folder of images with a manifest, or the records of a dataset split.

A *prediction manifest* names one edit per line, in JSONL or CSV (chosen by the file's suffix):

- ``.jsonl``: one JSON object per line, ``{"id": "cat-1", "image": "cat.png", "instruction": "make it blue"}``;
  other keys are ignored, blank lines skipped.
- ``.csv``: a header row naming the columns ``id``, ``image`` and ``instruction`` (in any order, other
  columns ignored), then one row per edit; quote fields that hold commas.

``image`` is a path relative to the image folder (``--data.init_args.predict_images``; default: the
manifest's folder) or absolute. ``id`` names the output, ``<out>/<id>.png`` (``/`` makes sub-folders, as in
Reason-Edit's ids; no ``..``, backslash or control character). The first bad line (not UTF-8, not JSON,
a missing or empty field, an unsafe or repeated id, an image that does not exist) stops the run with one
line naming the manifest and the line number. An image that exists but cannot be read is reported when
its turn comes, and the other edits go on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from insightedit.data.images import CLIP_MEAN, CLIP_STD, clip_preprocess
from insightedit.data.records import MAX_INSTRUCTION_CHARS, EditRecord
from insightedit.errors import UserError
from insightedit.image_reader import DEFAULT_MAX_PIXELS, UnreadableImage, load_rgb

log = logging.getLogger(__name__)

MANIFEST_FIELDS: tuple[str, ...] = ("id", "image", "instruction")
INSTRUCTION_CHOICES: tuple[str, ...] = ("plain", "reasoning")
MAX_ID_SEGMENT_BYTES = 200


@dataclass(frozen=True)
class PredictRecord:
    """One edit to predict: its id (the output's name), the source image and the instruction."""

    id: str
    image: Path
    instruction: str


def id_problem(record_id: str) -> str | None:
    """Why ``record_id`` cannot name an output file ``<out>/<id>.png``, or ``None`` if it can.

    ``/`` separates sub-folders; a segment may not be empty, ``.`` or ``..``, start or end with a space,
    hold a backslash or a control character, or be longer than 200 bytes (file names end at 255).
    """
    if not record_id:
        return "the id is empty"
    for segment in record_id.split("/"):
        if segment in ("", ".", ".."):
            return f"id {record_id!r} has an empty, '.' or '..' path segment"
        if segment != segment.strip() or "\\" in segment or any(ord(c) < 32 or ord(c) == 127 for c in segment):
            return f"id {record_id!r} has a backslash, a control character or spaces at a segment's ends"
        if len(segment.encode("utf-8")) > MAX_ID_SEGMENT_BYTES:
            return f"id {record_id!r} has a path segment over {MAX_ID_SEGMENT_BYTES} bytes"
    return None


def _cut(instruction: str, where: str) -> str:
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        log.warning("%s: instruction cut to %d characters", where, MAX_INSTRUCTION_CHARS)
        return instruction[:MAX_INSTRUCTION_CHARS]
    return instruction


def _jsonl_rows(text_lines: list[bytes], path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, data in enumerate(text_lines, start=1):
        if not data.strip():
            continue
        try:
            parsed = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{path}:{number}: not UTF-8 text") from None
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(parsed, dict):
            raise UserError(f"{path}:{number}: not a JSON object with id, image and instruction")
        rows.append((number, parsed))
    return rows


def _csv_rows(raw: bytes, path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [name for name in MANIFEST_FIELDS if name not in header]
    if missing:
        raise UserError(
            f"{path}:1: the CSV header lacks the column(s) {', '.join(missing)} (it needs id,image,instruction)"
        )
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        for row in reader:
            if not any((value or "").strip() for value in row.values() if isinstance(value, str)):
                continue
            if None in row:  # more fields than the header names
                raise UserError(f"{path}:{reader.line_num}: more fields than the header's {len(header)}")
            rows.append((reader.line_num, row))
    except csv.Error as error:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({error})") from None
    return rows


def read_predict_manifest(path: str | Path, image_dir: str | Path | None = None) -> list[PredictRecord]:
    """The edits a prediction manifest names, in file order; the first bad line is a :class:`UserError`.

    ``image_dir``: the folder relative image paths resolve against (default: the manifest's folder).
    """
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise UserError(f"prediction manifest {path}: name it .jsonl (JSON lines) or .csv (id,image,instruction)")
    try:
        raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    except OSError as error:
        raise UserError(f"cannot read prediction manifest {path}: {error.strerror or error}") from None
    folder = Path(image_dir) if image_dir is not None else path.parent
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist")
    rows = _csv_rows(raw, path) if path.suffix.lower() == ".csv" else _jsonl_rows(raw.split(b"\n"), path)
    records: list[PredictRecord] = []
    first_seen: dict[str, int] = {}
    for number, row in rows:
        where = f"{path}:{number}"
        for name in MANIFEST_FIELDS:
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                kind = "missing" if value is None else "empty" if isinstance(value, str) else "not a string"
                raise UserError(f"{where}: field {name!r} is {kind}")
        record_id = row["id"]
        problem = id_problem(record_id)
        if problem:
            raise UserError(f"{where}: {problem}")
        if record_id in first_seen:
            raise UserError(f"{where}: id {record_id!r} repeats line {first_seen[record_id]}")
        first_seen[record_id] = number
        image = folder / row["image"]
        if not image.is_file():
            raise UserError(f"{where}: image {image} not found")
        records.append(PredictRecord(record_id, image, _cut(row["instruction"].strip(), where)))
    if not records:
        raise UserError(f"prediction manifest {path} names no edits")
    return records


def records_to_predict(records: Sequence[EditRecord], instruction: str = "plain") -> list[PredictRecord]:
    """Dataset records as edits: the source image and one phrasing of the instruction.

    ``instruction``: ``plain``, the first templated phrasing (what ``insightedit evaluate`` scores
    against), or ``reasoning``, the first reasoning phrasing (the plain one where a record has none).
    Records without any instruction are left out, with a warning.
    """
    if instruction not in INSTRUCTION_CHOICES:
        raise UserError(f"predict_instruction must be one of {', '.join(INSTRUCTION_CHOICES)}, got {instruction!r}")
    chosen: list[PredictRecord] = []
    for record in records:
        problem = id_problem(str(record.id))
        if problem:
            raise UserError(f"record {record.id!r} cannot be predicted: {problem}")
        pool = list(record.instructions)
        if instruction == "reasoning" and record.reasoning_instructions:
            pool = list(record.reasoning_instructions)
        pool = pool or list(record.reasoning_instructions)
        if not pool:
            log.warning("record %s has no instruction: not predicted", record.id)
            continue
        chosen.append(PredictRecord(str(record.id), Path(record.source_path), pool[0][:MAX_INSTRUCTION_CHARS]))
    return chosen


class PredictDataset(Dataset):
    """Edits as samples: the whole source image (uint8, 3 × H × W), the MLLM's view and the instruction.

    An image the reader refuses becomes a sample with ``error`` set (and ``None`` images): the system
    reports it and goes on with the others.
    """

    def __init__(
        self,
        records: Sequence[PredictRecord],
        resolution: int,
        mllm_size: int = 336,
        mllm_mean: Sequence[float] = CLIP_MEAN,
        mllm_std: Sequence[float] = CLIP_STD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.records = list(records)
        self.resolution = resolution
        self.max_pixels = max_pixels
        self.mllm = clip_preprocess(mllm_size, mllm_mean, mllm_std)

    def __len__(self) -> int:
        """Number of edits."""
        return len(self.records)

    def without(self, done: set[str]) -> PredictDataset:
        """The same dataset less the records whose id is in ``done`` (their outputs exist)."""
        kept = PredictDataset.__new__(PredictDataset)
        kept.__dict__.update(self.__dict__)
        kept.records = [record for record in self.records if record.id not in done]
        return kept

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of edit ``index``."""
        record = self.records[index]
        sample: dict[str, Any] = {
            "id": record.id,
            "image_path": str(record.image),
            "instruction": record.instruction,
            "resolution": self.resolution,
            "image": None,
            "mllm_source": None,
            "error": None,
        }
        try:
            image = load_rgb(record.image, max_pixels=self.max_pixels).image
        except UnreadableImage as error:
            sample["error"] = str(error)
            return sample
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())  # (3, H, W)
        sample["image"] = pixels
        sample["mllm_source"] = self.mllm(image)  # (3, S, S)
        return sample


def collate_predict(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists per field (images differ in size); ``mllm_source`` stacked where every sample has one."""
    batch: dict[str, Any] = {key: [sample[key] for sample in samples] for key in samples[0]}
    views = batch["mllm_source"]
    batch["mllm_source"] = views if any(view is None for view in views) else torch.stack(views)
    return batch


__all__ = [
    "INSTRUCTION_CHOICES",
    "MANIFEST_FIELDS",
    "PredictDataset",
    "PredictRecord",
    "collate_predict",
    "id_problem",
    "read_predict_manifest",
    "records_to_predict",
]
