"""Pair a benchmark with a folder of predictions, listing every missing and unexpected file.

Naming rule: the prediction for a record is ``<pred-dir>/<record id>.png``. Reason-Edit ids are
``<subset folder>/<source stem>`` (e.g. ``1-Left-Right/0001``); AdvancedEdit ids are the records' ``id``.
``--pred-layout smartedit`` instead reads SmartEdit's own output folders (``LeftRight_metrics_1/*.png``)
paired by sorted order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from insightedit.errors import UserError
from insightedit.evaluation.protocols import EvalSample
from insightedit.evaluation.reason_edit import read_reason_edit, smartedit_prediction_paths

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Collection:
    """Samples with a prediction, plus what could not be scored and why."""

    samples: list[EvalSample]
    missing: list[str] = field(default_factory=list)  # record ids without a prediction file
    unexpected: list[str] = field(default_factory=list)  # files in pred-dir that match no record
    skipped: dict[str, str] = field(default_factory=dict)  # record id -> reason it is not scored
    notes: dict[str, str] = field(default_factory=dict)  # record id -> what was scored differently, and why
    n_records: int = 0


def _prediction_files(pred_dir: Path) -> list[Path]:
    return sorted(p for p in pred_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _match(ids: list[str], pred_dir: Path) -> tuple[dict[str, Path], list[str], list[str]]:
    wanted = {f"{record_id}.png": record_id for record_id in ids}
    found: dict[str, Path] = {}
    unexpected: list[str] = []
    for path in _prediction_files(pred_dir):
        relative = path.relative_to(pred_dir).as_posix()
        if relative in wanted:
            found[wanted[relative]] = path
        else:
            unexpected.append(relative)
    missing = [record_id for record_id in ids if record_id not in found]
    return found, missing, unexpected


def collect_reason_edit(root: Path, pred_dir: Path, layout: str = "ids") -> Collection:
    """Reason-Edit items paired with predictions by id (``layout='ids'``) or SmartEdit's folders."""
    items = read_reason_edit(root)
    ids = [item.id for item in items]
    if layout == "ids":
        found, missing, unexpected = _match(ids, pred_dir)
    elif layout == "smartedit":
        found = smartedit_prediction_paths(pred_dir, items)
        used = {path.resolve() for path in found.values()}
        missing = [record_id for record_id in ids if record_id not in found]
        unexpected = [
            p.relative_to(pred_dir).as_posix() for p in _prediction_files(pred_dir) if p.resolve() not in used
        ]
    else:
        raise UserError(f"unknown prediction layout {layout!r}; choose ids or smartedit")
    samples = [
        EvalSample(
            id=item.id,
            group=item.group,
            subset=item.subset,
            source=item.source_path,
            edited=found[item.id],
            mask=item.mask_path,
            instruction=item.instruction,
            caption=item.caption,
        )
        for item in items
        if item.id in found
    ]
    return Collection(samples, missing, unexpected, {}, n_records=len(items))


def collect_advancededit(root: Path, pred_dir: Path) -> Collection:
    """AdvancedEdit records (``data.records.load_records``) paired with ``<id>.png`` predictions."""
    try:
        from insightedit.data.records import load_records
    except ImportError as error:
        raise UserError(f"the AdvancedEdit reader is not available ({error})") from error
    record_set = load_records(root)
    records = list(record_set)
    skipped: dict[str, str] = {str(bad.where): str(bad.reason) for bad in getattr(record_set, "bad", [])}
    if not records:
        raise UserError(f"no AdvancedEdit records under {root}")
    ids = [str(record.id) for record in records]
    duplicates = sorted({record_id for record_id in ids if ids.count(record_id) > 1})
    if duplicates:
        raise UserError(f"duplicate record ids under {root}: {', '.join(duplicates[:5])}")
    found, missing, unexpected = _match(ids, pred_dir)
    samples: list[EvalSample] = []
    notes: dict[str, str] = {}
    for record in records:
        record_id = str(record.id)
        if record_id not in found:
            continue
        if not record.instructions:
            skipped[record_id] = "record has no instruction"
            continue
        if not Path(record.source_path).is_file():
            skipped[record_id] = f"source image not found: {record.source_path}"
            continue
        target = Path(record.target_path) if record.target_path else None
        if target is not None and not target.is_file():
            notes[record_id] = f"target image not found ({target}): target metrics n/a"
            target = None
        samples.append(
            EvalSample(
                id=record_id,
                group="all",
                subset=str(record.task_type),
                source=Path(record.source_path),
                edited=found[record_id],
                mask=record.mask,
                instruction=record.instructions[0],
                caption=str(record.target_caption),
                target=target,
            )
        )
    n_records = len(records) + len(getattr(record_set, "bad", []))
    return Collection(samples, missing, unexpected, skipped, notes, n_records=n_records)


def collect(protocol_name: str, root: str | Path, pred_dir: str | Path, layout: str = "ids") -> Collection:
    """Samples for ``protocol_name`` from a benchmark ``root`` and a prediction folder."""
    root, pred_dir = Path(root).expanduser(), Path(pred_dir).expanduser()
    if not root.exists():
        raise UserError(f"data folder {root} does not exist")
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder {pred_dir} does not exist")
    if protocol_name == "reason_edit":
        return collect_reason_edit(root, pred_dir, layout)
    if layout != "ids":
        raise UserError(f"--pred-layout {layout} applies to reason_edit only")
    if protocol_name == "advancededit":
        return collect_advancededit(root, pred_dir)
    raise UserError(f"no dataset reader for protocol {protocol_name!r}")
