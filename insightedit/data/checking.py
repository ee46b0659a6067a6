"""Validate a dataset: which records are usable, which are skipped and why, which files were fixed."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from insightedit.data.images import BadSample, LoadedImage, load_rgb, probe_image, same_aspect
from insightedit.data.records import BadRecord, EditRecord, InvalidMask, RecordSet, load_records
from insightedit.data.samples import check_pair, resolved_paths
from insightedit.errors import UserError


@dataclass
class CheckReport:
    """Outcome of scanning a record set: usable records, skipped ones with reasons, exact fixes."""

    good: list[EditRecord]
    bad: list[BadRecord]
    fixes: Counter[str] = field(default_factory=Counter)
    root: Path | None = None
    format: str = ""
    warnings: list[BadRecord] = field(default_factory=list)  # usable records changed at load (lossy), and why

    @property
    def total(self) -> int:
        """Records seen, usable or not (a malformed file counts as one)."""
        return len(self.good) + len(self.bad)

    @property
    def bad_fraction(self) -> float:
        """Share of skipped records."""
        return len(self.bad) / self.total if self.total else 0.0

    def task_counts(self) -> dict[str, int]:
        """Usable records per task type."""
        return RecordSet(self.good).task_counts()

    def bad_reasons(self) -> Counter[str]:
        """Skipped records per kind of reason (the reason's first words)."""
        return Counter(reason_kind(bad.reason) for bad in self.bad)

    def summary(self, max_listed: int = 20) -> str:
        """A human-readable multi-line summary."""
        lines = [
            f"dataset: {self.root} ({self.format})",
            f"records: {self.total} ({len(self.good)} usable, {len(self.bad)} bad)",
            "per type: " + ", ".join(f"{task} {count}" for task, count in self.task_counts().items()),
            f"source images: {len({record.source_id for record in self.good})}",
        ]
        if self.fixes:
            lines.append("fixed while loading: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.fixes.items())))
        if self.warnings:
            lines.append(f"warnings: {len(self.warnings)} records changed at load")
            lines += [f"  {warning}" for warning in self.warnings[:max_listed]]
            if len(self.warnings) > max_listed:
                lines.append(f"  ... and {len(self.warnings) - max_listed} more")
        if self.bad:
            lines.append("bad records by reason: " + ", ".join(f"{k} x{v}" for k, v in self.bad_reasons().items()))
            lines += [f"  {bad}" for bad in self.bad[:max_listed]]
            if len(self.bad) > max_listed:
                lines.append(f"  ... and {len(self.bad) - max_listed} more")
        return "\n".join(lines)


def reason_kind(reason: str) -> str:
    """A short category of a reason, for counting (``missing image``, ``invalid RLE``, ...)."""
    text = reason.split(": ", 1)[-1] if reason.startswith(("source:", "target:")) else reason
    for kind in (
        "not UTF-8", "not a record object", "missing required field", "duplicate id", "invalid instruction",
        "invalid bbox", "missing task_type",
        "invalid RLE", "not an image", "missing image", "truncated", "corrupt", "too large", "empty instruction",
        "malformed", "size mismatch", "does not match source", "no edited image", "ambiguous",
        "unknown task_type", "no target", "no segmentation",
    ):  # fmt: skip
        if kind in text:
            return kind
    return text.split(" (")[0][:40]


class _ImageCache:
    """The last few loaded images, so records sharing a source decode it once."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.items: OrderedDict[Path, LoadedImage | BadSample] = OrderedDict()
        self.fixes: Counter[str] = Counter()

    def load(self, path: Path) -> LoadedImage:
        if path not in self.items:
            try:
                loaded: LoadedImage | BadSample = load_rgb(path)
                self.fixes.update(loaded.fixes)  # type: ignore[union-attr]
            except BadSample as error:
                loaded = error
            self.items[path] = loaded
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        item = self.items[path]
        if isinstance(item, BadSample):
            raise item
        return item


def _light_check(record: EditRecord, sizes: dict[Path, tuple[int, int] | str]) -> None:
    """Header-only checks of a record's files; raise :class:`BadSample` with the reason."""
    resolved_paths(record)
    found: list[tuple[int, int]] = []
    for path in (record.source_path, record.target_path):
        if path not in sizes:
            try:
                sizes[path] = probe_image(path)
            except BadSample as error:
                sizes[path] = str(error)
        size = sizes[path]
        if isinstance(size, str):
            raise BadSample(size)
        found.append(size)
    if not same_aspect(found[0], found[1]):
        raise BadSample(f"source/target size mismatch {found[0]} vs {found[1]}")
    height, width = (record.segmentation or {}).get("size", (0, 0))
    if not (same_aspect((width, height), found[0]) or same_aspect((height, width), found[0])):
        raise BadSample(f"mask size {width}x{height} does not match source {found[0]}")


def scan_records(record_set: RecordSet, *, full: bool = True) -> CheckReport:
    """Check every record: ``full`` decodes images and masks; otherwise only headers and RLE sizes."""
    good: list[EditRecord] = []
    bad = list(record_set.bad)
    cache = _ImageCache()
    sizes: dict[Path, tuple[int, int] | str] = {}
    for record in record_set:
        try:
            if full:
                source_path, target_path = resolved_paths(record)
                check_pair(record, cache.load(source_path), cache.load(target_path))
            else:
                _light_check(record, sizes)
        except (BadSample, InvalidMask) as error:
            bad.append(BadRecord(record.id, str(error)))
            continue
        good.append(record)
    return CheckReport(good, bad, cache.fixes, record_set.root, record_set.format, list(record_set.warnings))


def check_dataset(
    root: str | Path,
    *,
    full: bool = True,
    image_root: str | Path | None = None,
    target_root: str | Path | None = None,
) -> CheckReport:
    """Load and scan the dataset at ``root`` (any format :func:`load_records` reads)."""
    return scan_records(load_records(root, image_root=image_root, target_root=target_root), full=full)


def enforce_bad_fraction(report: CheckReport, max_bad_fraction: float, max_listed: int = 10) -> None:
    """Raise :class:`UserError` naming files and reasons when too many records are bad."""
    if report.total == 0:
        raise UserError(f"no records found in {report.root}")
    if report.bad_fraction <= max_bad_fraction and report.good:
        return
    examples: dict[str, list[BadRecord]] = {}
    for bad in report.bad:
        examples.setdefault(reason_kind(bad.reason), []).append(bad)
    listed = "; ".join(f"{kind} x{len(items)} (e.g. {items[0]})" for kind, items in list(examples.items())[:max_listed])
    raise UserError(
        f"{len(report.bad)} of {report.total} records in {report.root} are bad "
        f"({report.bad_fraction:.1%} > max_bad_fraction {max_bad_fraction:.1%}): {listed}"
    )
