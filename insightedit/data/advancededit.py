"""Read AdvancedEdit records exactly as the official construction pipeline writes them.

Layouts understood:

* a **pipeline root** (``0_source_img/``, ``3_editing_pair_construction/{remove_add,replace}/json_file/``,
  ``.../target_imgs/``, ``4_instruction_recaption/...``, ``5_quality_evaluation/...``): the records of
  steps 3, 4 and 5 are merged per (image, group, key), later steps adding or overriding fields, so a
  record carries step 4's reasoning instructions and step 5's judge scores;
* any **folder of JSON files** (each a list, or a dict keyed ``"0"``, ``"1"``, ... of records, named
  after the source image id).

**Naming rule for blank path fields** (the official scripts ``3_1_remove_add_construction.py`` and
``3_2_replace_construction.py``): the edited image of object ``k`` (1-based index in the image's
step-2 annotations) of source ``{id}`` is ``{id}_{k}_{slug(class)}.png`` for remove/add and
``{id}_{k}_{slug(class_origin)}_to_{slug(class_target)}.png`` for replace, with
``slug = lower(name).replace(" ", "_").replace("/", "_")``. A remove record goes original → edited,
its add twin edited → original; a replace record whose edited file is named ``origin_to_target`` goes
original → edited, otherwise (its reverse twin) edited → original. The original is ``{id}.<ext>`` in
``0_source_img`` (or ``image_root``); edited images are searched in ``target_imgs`` folders (or
``target_root``). A filled path is used when it exists (absolute, or relative to the JSON file or the
root), else its file name is looked up in the same folders. When several ``k`` match, the step-2 mask
file decides by matching the segmentation; otherwise the record is reported as ambiguous.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from insightedit.data.records import (
    BadRecord,
    EditRecord,
    RecordError,
    RecordSet,
    check_record_fields,
    instruction_list,
    json_type,
    parse_bbox,
    truncate_instructions,
)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RECORD_STEPS = re.compile(r"^([345])_")
KNOWN_FIELDS = {
    "target_img_path", "origin_img_path", "instruction", "task_type", "img_caption", "class_origin",
    "class_target", "bbox", "segmentation", "target_caption", "source_caption",
}  # fmt: skip


def slug(name: str) -> str:
    """The official pipeline's file-name form of a class name."""
    return name.replace(" ", "_").replace("/", "_").lower()


def is_pipeline_root(root: Path) -> bool:
    """Whether ``root`` has the official pipeline's step folders holding records."""
    return root.is_dir() and any(child.is_dir() and RECORD_STEPS.match(child.name) for child in root.iterdir())


def read_record_file(path: Path) -> list[tuple[str, Any]]:
    """Return ``(key, record)`` pairs of a JSON record file (list or index-keyed dict).

    Raises ``ValueError`` with a one-line reason when the file is malformed or holds no record object;
    single entries that are not objects are returned as they are, for the caller to report.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"malformed JSON ({error})") from None
    if isinstance(data, list):
        pairs = [(str(index), item) for index, item in enumerate(data)]
    elif isinstance(data, dict) and "task_type" in data:
        pairs = [("0", data)]
    elif isinstance(data, dict):
        pairs = [(str(key), item) for key, item in data.items()]
    else:
        raise ValueError("JSON is neither a list nor a dict of records")
    if pairs and not any(isinstance(item, dict) for _, item in pairs):
        raise ValueError("JSON entries are not record objects")
    return pairs


def _group_of(path: Path, pairs: list[tuple[str, dict[str, Any]]]) -> str:
    """``remove_add`` or ``replace``: from the folder name, else from the records' task types."""
    for part in path.parts:
        if part in ("remove_add", "replace"):
            return part
    if pairs and all(item.get("task_type") == "replace" for _, item in pairs):
        return "replace"
    return "remove_add"


def _natural_key(text: str) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


class _ImageFinder:
    """Finds originals and edited images by the naming rule; lists each folder once."""

    def __init__(self, source_dirs: list[Path], target_dirs: list[Path], bases: list[Path]) -> None:
        self.source_dirs = [d for d in dict.fromkeys(source_dirs) if d.is_dir()]
        self.target_dirs = [d for d in dict.fromkeys(target_dirs) if d.is_dir()]
        self.bases = bases
        self.by_name: dict[str, Path] = {}
        self.originals: dict[str, Path] = {}
        self.edited: dict[tuple[str, str], dict[int, Path]] = defaultdict(dict)
        for folder in self.source_dirs + self.target_dirs:
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                self.by_name.setdefault(file.name, file)
                if folder in self.source_dirs:
                    self.originals.setdefault(file.stem, file)
                if folder in self.target_dirs:
                    for match in re.finditer(r"_(\d+)_", file.stem):
                        prefix, rest = file.stem[: match.start()], file.stem[match.end() :]
                        self.edited[(prefix, rest)].setdefault(int(match.group(1)), file)

    def given(self, value: Any, json_dir: Path) -> Path | None:
        """A filled path field resolved to an existing file, or ``None``."""
        if not isinstance(value, str) or not value.strip():
            return None
        path = Path(value.strip())
        candidates = [path] if path.is_absolute() else [base / path for base in (json_dir, *self.bases)]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        return self.by_name.get(path.name)

    def original(self, image_id: str) -> Path:
        """The original image of ``image_id`` (an expected path when absent, so it reports as missing)."""
        if image_id in self.originals:
            return self.originals[image_id]
        folder = self.source_dirs[0] if self.source_dirs else (self.bases[0] / "0_source_img")
        return folder / f"{image_id}.jpg"

    def placeholder(self, image_id: str) -> Path:
        """Where an unresolvable edited image would be; it reports as missing when loaded."""
        folder = self.target_dirs[0] if self.target_dirs else self.bases[0]
        return folder / f"{image_id}_unresolved.png"

    def edited_image(self, image_id: str, name: str, segmentation: Any, masks: dict[int, str]) -> Path | str:
        """The edited image ``{id}_{k}_{name}``; a reason string when absent or ambiguous."""
        found = self.edited.get((image_id, name), {})
        if len(found) == 1:
            return next(iter(found.values()))
        if not found:
            return f"no edited image {image_id}_<k>_{name}.png in the target_imgs folders"
        counts = segmentation.get("counts") if isinstance(segmentation, dict) else None
        chosen = [k for k in found if masks.get(k) is not None and masks.get(k) == counts]
        if len(chosen) == 1:
            return found[chosen[0]]
        return f"ambiguous edited image {image_id}_<k>_{name}: k in {sorted(found)}"


def _step2_masks(root: Path, image_id: str) -> dict[int, str]:
    """1-based annotation index → RLE counts from the step-2 mask file, when there is one."""
    path = root / "2_mask_generation" / f"{image_id}.json"
    try:
        annotations = json.loads(path.read_text(encoding="utf-8")).get("annotations", [])
        return {i + 1: a["segmentation"]["counts"] for i, a in enumerate(annotations)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _build(
    raw: dict[str, Any], key: str, image_id: str, group: str, json_path: Path, finder: _ImageFinder,
    masks: dict[int, str],
) -> EditRecord | BadRecord:  # fmt: skip
    """Turn one raw AdvancedEdit record into an :class:`EditRecord`, or say why not."""
    task = raw.get("task_type")
    task = task.strip() if isinstance(task, str) else "" if task is None else str(task)
    origin, target = str(raw.get("class_origin") or ""), str(raw.get("class_target") or "")
    source_path = finder.given(raw.get("origin_img_path"), json_path.parent)
    target_path = finder.given(raw.get("target_img_path"), json_path.parent)
    segmentation = raw.get("segmentation")
    unresolved = ""
    if source_path is None or target_path is None:
        original = finder.original(image_id)
        if task == "replace":
            forward = finder.edited_image(image_id, f"{slug(origin)}_to_{slug(target)}", segmentation, masks)
            backward = finder.edited_image(image_id, f"{slug(target)}_to_{slug(origin)}", segmentation, masks)
            if isinstance(forward, Path):
                pair: tuple[Path, Path | str] = (original, forward)
            elif isinstance(backward, Path):
                pair = (backward, original)
            else:
                pair = (original, forward)
            rule_source, rule_target = pair
        else:
            edited = finder.edited_image(image_id, slug(origin if task == "remove" else target), segmentation, masks)
            rule_source, rule_target = (original, edited) if task == "remove" else (edited, original)
        if source_path is None:
            if isinstance(rule_source, str):
                unresolved = f"source: {rule_source}"
                rule_source = finder.placeholder(image_id)
            source_path = rule_source
        if target_path is None:
            if isinstance(rule_target, Path):
                target_path = rule_target
            else:
                unresolved = f"target: {rule_target}"
    if task == "replace":
        caption = raw.get("detailed_caption_target") or raw.get("img_caption") or ""
    else:
        caption = raw.get("img_caption") or ""
    reasoning_keys = sorted((k for k in raw if k.startswith("reasoning_instruction")), key=_natural_key)
    try:
        instructions = instruction_list(raw.get("instruction"), "instruction", allow_string=True)
        reasoning = [text for k in reasoning_keys for text in instruction_list(raw[k], k, allow_string=True)]
        bbox = parse_bbox(raw.get("bbox"))
    except RecordError as error:
        return BadRecord(f"{image_id}/{group}/{key}", f"{error} (in {json_path})")
    record = EditRecord(
        id=f"{image_id}/{group}/{key}",
        source_id=image_id,
        source_path=source_path,
        target_path=target_path,
        instructions=instructions,
        reasoning_instructions=reasoning,
        task_type=task,
        target_caption=str(raw.get("target_caption") or caption),
        bbox=bbox,
        segmentation=segmentation,
        class_origin=origin,
        class_target=target,
        source_caption=str(raw.get("source_caption") or raw.get("img_caption") or ""),
        extra={k: v for k, v in raw.items() if k not in KNOWN_FIELDS and not k.startswith("reasoning_")},
    )
    if unresolved:
        record.extra["unresolved"] = unresolved
    reason = check_record_fields(record)
    return BadRecord(record.id, f"{reason} (in {json_path})") if reason else record


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Fields of a later pipeline step over an earlier one; blank values never erase filled ones."""
    if base.get("task_type") != update.get("task_type"):
        return dict(update)
    merged = dict(base)
    for key, value in update.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            merged.setdefault(key, value)
        else:
            merged[key] = value
    return merged


def load_advancededit(
    root: Path, *, pipeline: bool, image_root: str | Path | None = None, target_root: str | Path | None = None
) -> RecordSet:
    """Load a pipeline root or a folder of AdvancedEdit JSON files (see the module docstring)."""
    if root.is_file():
        files, root_dir = [root], root.parent
    elif pipeline:
        steps = sorted(c for c in root.iterdir() if c.is_dir() and RECORD_STEPS.match(c.name))
        files = [f for step in steps for f in sorted(step.rglob("*.json"), key=lambda p: _natural_key(str(p)))]
        root_dir = root
    else:
        files, root_dir = sorted(root.rglob("*.json"), key=lambda p: _natural_key(str(p))), root
    bad: list[BadRecord] = []
    raw: dict[tuple[str, str, str], tuple[dict[str, Any], Path]] = {}
    for path in files:
        try:
            pairs = read_record_file(path)
        except (OSError, ValueError) as error:
            bad.append(BadRecord(str(path), str(error)))
            continue
        for key, item in pairs:
            if not isinstance(item, dict):
                bad.append(BadRecord(f"{path} [{key}]", f"not a record object (a JSON {json_type(item)})"))
        pairs = [(key, item) for key, item in pairs if isinstance(item, dict)]
        group = _group_of(path, pairs)
        for key, item in pairs:
            slot = (path.stem, group, key)
            raw[slot] = (_merge(raw[slot][0], item) if slot in raw else item, path)
    source_dirs = [Path(image_root)] if image_root else []
    target_dirs = [Path(target_root)] if target_root else []
    for folder in {path.parent for _, path in raw.values()}:
        for up in [folder, *list(folder.parents)[:3]]:
            source_dirs += [up / "0_source_img", up / "source_imgs", up / "images"]
        target_dirs += [folder.parent / "target_imgs", folder / "target_imgs"]
    target_dirs += sorted(root_dir.glob("3_*/*/target_imgs")) + [root_dir / "target_imgs"]
    finder = _ImageFinder(sorted(source_dirs, key=str), target_dirs, [root_dir])
    records: list[EditRecord] = []
    warnings: list[BadRecord] = []
    masks_cache: dict[str, dict[int, str]] = {}
    for (image_id, group, key), (item, path) in sorted(raw.items(), key=lambda kv: _natural_key("/".join(kv[0]))):
        if image_id not in masks_cache:
            masks_cache[image_id] = _step2_masks(root_dir, image_id) if pipeline else {}
        built = _build(item, key, image_id, group, path, finder, masks_cache[image_id])
        if isinstance(built, BadRecord):
            bad.append(built)
            continue
        note = truncate_instructions(built)
        if note:
            warnings.append(BadRecord(f"{built.id} (in {path})", note))
        records.append(built)
    return RecordSet(records, bad, root_dir, "pipeline" if pipeline else "json", warnings)
