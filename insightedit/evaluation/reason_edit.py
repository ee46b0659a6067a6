"""Reader for the Reason-Edit benchmark folder (SmartEdit's evaluation set) and its prediction layouts.

Layout (as SmartEdit's ``test/metrics_evaluation.py`` reads it)::

    ROOT/1-Left-Right/        *.png sources, *_mask.jpg masks, Left_Right_text.txt
    ROOT/2-Relative-Size/     ... Size_text.txt
    ROOT/3-Mirror/            ... Mirror_text.txt
    ROOT/4-Color/             ... Color_text.txt
    ROOT/5-Multiple-Objects/  ... MultipleObjects_text.txt
    ROOT/6-Reasoning/         ... Reason_test.txt

Sources, masks and text lines are paired by sorted order; line *i* reads ``<instruction> CLIP: <caption>``.
Subsets 1–5 form the *understanding* group, 6 the *reasoning* group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from insightedit.errors import UserError


@dataclass(frozen=True)
class ReasonEditSubset:
    """One Reason-Edit subset: its folder, text file, SmartEdit output folder and group."""

    folder: str
    text_file: str
    smartedit_output: str
    group: str


SUBSETS: tuple[ReasonEditSubset, ...] = (
    ReasonEditSubset("1-Left-Right", "Left_Right_text.txt", "LeftRight_metrics_1", "understanding"),
    ReasonEditSubset("2-Relative-Size", "Size_text.txt", "RelativeSize_metrics_2", "understanding"),
    ReasonEditSubset("3-Mirror", "Mirror_text.txt", "Mirror_metrics_3", "understanding"),
    ReasonEditSubset("4-Color", "Color_text.txt", "Color_metrics_4", "understanding"),
    ReasonEditSubset("5-Multiple-Objects", "MultipleObjects_text.txt", "MultipleObjects_metrics_5", "understanding"),
    ReasonEditSubset("6-Reasoning", "Reason_test.txt", "Reasoning_metrics_1", "reasoning"),
)


@dataclass(frozen=True)
class ReasonEditItem:
    """One benchmark entry; ``id`` is ``<subset folder>/<source stem>``."""

    id: str
    subset: str
    group: str
    index: int
    source_path: Path
    mask_path: Path
    instruction: str
    caption: str


def parse_benchmark_line(line: str, where: str) -> tuple[str, str]:
    """Split ``<instruction> CLIP: <caption>`` into (instruction, caption); raise on a malformed line."""
    if "CLIP: " not in line:
        raise UserError(f"{where}: malformed Reason-Edit line (no 'CLIP: ' marker): {line.strip()[:80]!r}")
    instruction, caption = line.split("CLIP: ", 1)
    instruction, caption = instruction.rstrip(), caption.strip()
    if not instruction or not caption:
        raise UserError(f"{where}: empty instruction or caption in {line.strip()[:80]!r}")
    return instruction, caption


def _find_subset_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    names = {subset.folder for subset in SUBSETS}
    for path in sorted(root.rglob("*")):
        if path.is_dir() and path.name in names:
            if path.name in found:
                raise UserError(f"Reason-Edit subset {path.name} found twice: {found[path.name]} and {path}")
            found[path.name] = path
    return found


def read_subset(folder: Path, subset: ReasonEditSubset) -> list[ReasonEditItem]:
    """Read one subset folder, pairing sources, masks and text lines by sorted order."""
    sources = sorted(folder.glob("*.png"), key=str)
    masks = sorted(folder.glob("*_mask.jpg"), key=str)
    text_path = folder / subset.text_file
    if not text_path.is_file():
        raise UserError(f"Reason-Edit subset {folder} has no {subset.text_file}")
    lines = text_path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not (len(sources) == len(masks) == len(lines)):
        raise UserError(
            f"Reason-Edit subset {folder}: {len(sources)} source .png, {len(masks)} *_mask.jpg and "
            f"{len(lines)} lines in {subset.text_file}; they must match one to one"
        )
    items = []
    for index, (source, mask, line) in enumerate(zip(sources, masks, lines, strict=True)):
        instruction, caption = parse_benchmark_line(line, f"{text_path}:{index + 1}")
        items.append(
            ReasonEditItem(
                id=f"{subset.folder}/{source.stem}",
                subset=subset.folder,
                group=subset.group,
                index=index,
                source_path=source,
                mask_path=mask,
                instruction=instruction,
                caption=caption,
            )
        )
    return items


def read_reason_edit(root: str | Path) -> list[ReasonEditItem]:
    """Read every Reason-Edit subset found under ``root`` (at least one must exist)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"Reason-Edit folder {root} does not exist")
    found = _find_subset_dirs(root)
    if not found:
        raise UserError(f"no Reason-Edit subset folder ({', '.join(s.folder for s in SUBSETS)}) under {root}")
    items: list[ReasonEditItem] = []
    for subset in SUBSETS:
        if subset.folder in found:
            items.extend(read_subset(found[subset.folder], subset))
    return items


def smartedit_prediction_paths(pred_dir: Path, items: list[ReasonEditItem]) -> dict[str, Path]:
    """Pair items with SmartEdit's output folders (``LeftRight_metrics_1/*.png`` …) by sorted order.

    A folder with fewer files than its subset leaves the last items unpaired (reported missing); one
    with more files is an error, since sorted-order pairing would then be ambiguous.
    """
    by_subset = {subset.folder: subset for subset in SUBSETS}
    paths: dict[str, Path] = {}
    for folder in sorted({item.subset for item in items}):
        subset_items = [item for item in items if item.subset == folder]
        output_dir = pred_dir / by_subset[folder].smartedit_output
        files = sorted(output_dir.glob("*.png"), key=str) if output_dir.is_dir() else []
        if len(files) > len(subset_items):
            raise UserError(f"{output_dir} holds {len(files)} images for {len(subset_items)} benchmark entries")
        for item, path in zip(subset_items, files, strict=False):
            paths[item.id] = path
    return paths
