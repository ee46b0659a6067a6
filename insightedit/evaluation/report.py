"""Aggregate per-edit rows into group means, print the table, write JSON and CSV.

Every mean is taken over the edits where the metric exists; ``n`` columns say how many. PSNR means use
the capped per-image values (see ``PSNR_CAP_DB``) and ``psnr_n_capped`` counts the capped images. The
printed table groups its columns by what they compare (source outside the mask, target, the edited image
alone) and shows a PSNR whose every image was capped as ``∞``; JSON and CSV keep the capped number.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from insightedit.atomic_write import OutputNotWritten, atomic_write, explain
from insightedit.redaction import redact, redact_value

METRICS: tuple[str, ...] = (
    "clip",
    "psnr",
    "ssim",
    "lpips",
    "psnr_target",
    "ssim_target",
    "lpips_target",
    "psnr_in_mask",
)
VIESCORE_KEYS: tuple[str, ...] = ("viescore_O/10", "viescore_SC", "viescore_PQ")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate_rows(rows: Sequence[dict[str, object]]) -> dict[str, object]:
    """Means of every metric over ``rows`` (skipping missing values) with counts of capped and missing."""
    summary: dict[str, object] = {"n": len(rows)}
    for metric in METRICS:
        values = [float(row[metric]) for row in rows if row.get(metric) is not None]  # type: ignore[arg-type]
        if values or any(metric in row for row in rows):
            summary[metric] = _mean(values)
            summary[f"{metric}_n"] = len(values)
    for capped in ("psnr_capped", "psnr_target_capped", "psnr_in_mask_capped"):
        if any(capped in row for row in rows):
            summary[capped.replace("_capped", "_n_capped")] = sum(bool(row.get(capped)) for row in rows)
    if any("viescore_O" in row for row in rows):
        overall = [float(row["viescore_O"]) for row in rows if row.get("viescore_O") is not None]  # type: ignore[arg-type]
        sc = [float(row["viescore_SC"]) for row in rows if row.get("viescore_SC") is not None]  # type: ignore[arg-type]
        pq = [float(row["viescore_PQ"]) for row in rows if row.get("viescore_PQ") is not None]  # type: ignore[arg-type]
        mean_overall = _mean(overall)
        summary["viescore_O/10"] = None if mean_overall is None else mean_overall / 10.0
        summary["viescore_SC"] = _mean(sc)
        summary["viescore_PQ"] = _mean(pq)
        summary["viescore_n_scored"] = len(overall)
        summary["viescore_n_failed"] = sum(1 for row in rows if row.get("viescore_error"))
    return summary


def aggregate_groups(rows: Sequence[dict[str, object]]) -> dict[str, dict[str, object]]:
    """Aggregates per ``group`` and per ``subset`` (``subset:<name>``); groups are never pooled."""
    groups: dict[str, dict[str, object]] = {}
    for group in dict.fromkeys(str(row["group"]) for row in rows):
        groups[group] = aggregate_rows([row for row in rows if row["group"] == group])
    for subset in dict.fromkeys(str(row["subset"]) for row in rows):
        groups[f"subset:{subset}"] = aggregate_rows([row for row in rows if row["subset"] == subset])
    return groups


SOURCE_SECTION = "vs source, outside mask"
TARGET_SECTION = "vs target"
EDIT_SECTION = "edited image alone"


@dataclass(frozen=True)
class Column:
    """A table column: the summary key, its title (with ↑/↓: which way is better), digits and section."""

    key: str
    title: str
    digits: int
    section: str


# the paper's metrics, grouped by what they compare; a table shows the columns some group has
COLUMNS: tuple[Column, ...] = (
    Column("psnr", "PSNR ↑", 2, SOURCE_SECTION),
    Column("ssim", "SSIM ↑", 3, SOURCE_SECTION),
    Column("lpips", "LPIPS ↓", 3, SOURCE_SECTION),
    Column("psnr_in_mask", "in-mask PSNR ↑", 2, TARGET_SECTION),
    Column("psnr_target", "PSNR ↑", 2, TARGET_SECTION),
    Column("ssim_target", "SSIM ↑", 3, TARGET_SECTION),
    Column("lpips_target", "LPIPS ↓", 3, TARGET_SECTION),
    Column("clip", "CLIP ↑", 3, EDIT_SECTION),
    Column("viescore_O/10", "VIE O/10 ↑", 3, EDIT_SECTION),
    Column("viescore_SC", "SC ↑", 2, EDIT_SECTION),
    Column("viescore_PQ", "PQ ↑", 2, EDIT_SECTION),
)

PARTLY_CAPPED_NOTE = (
    "* some edits equal the reference in that region (PSNR ∞); the mean counts them as {cap:g} dB "
    "(*_n_capped in the report)"
)

_ASCII = {"∞": "inf", "↑": "(+)", "↓": "(-)", "·": "."}


def for_console(text: str, encoding: str | None = None) -> str:
    """``text`` as is when the console's encoding (default: ``sys.stdout``'s) can show it, else ∞ → inf, ↑ → (+)."""
    encoding = encoding or getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        for symbol, plain in _ASCII.items():
            text = text.replace(symbol, plain)
    return text


def _cell(value: object, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _metric_cell(summary: dict[str, object], column: Column) -> tuple[str, bool]:
    """The cell of one group mean and whether it is a PSNR mean with some (not all) images capped."""
    value = summary.get(column.key)
    capped, counted = summary.get(f"{column.key}_n_capped"), summary.get(f"{column.key}_n")
    if value is not None and isinstance(capped, int) and isinstance(counted, int) and capped > 0:
        if capped == counted:
            return "∞", False  # every image equal to its reference: the mean of infinities
        return _cell(value, column.digits) + "*", True
    return _cell(value, column.digits), False


def format_grouped_table(
    labels: Sequence[str], rows: Sequence[tuple[Sequence[str], dict[str, object]]], cap_db: float
) -> list[str]:
    """Table lines: a section header (what each group of columns compares), column titles, one line per row.

    ``labels`` title the leading columns; each row is (its label cells, a group summary). Columns no
    summary has a value for (metrics not computed) are left out; a PSNR mean over images all equal to
    the reference prints ``∞``, a mean with some capped gets ``*`` and a note below.
    """
    columns = [c for c in COLUMNS if any(summary.get(c.key) is not None for _, summary in rows)]
    cells, partly_capped = [], False
    for label, summary in rows:
        line = list(label)
        for column in columns:
            cell, partly = _metric_cell(summary, column)
            line.append(cell)
            partly_capped |= partly
        cells.append(line)
    titles = [*labels, *(c.title for c in columns)]
    widths = [max(len(line[i]) for line in [titles, *cells]) for i in range(len(titles))]
    sections = [("", list(range(len(labels))))]
    for column_index, column in enumerate(columns, start=len(labels)):
        if sections[-1][0] != column.section:
            sections.append((column.section, []))
        sections[-1][1].append(column_index)
    for name, indices in sections:  # widen a section's last column until its name fits above it
        span = sum(widths[i] for i in indices) + 2 * (len(indices) - 1)
        widths[indices[-1]] += max(0, len(name) - span)

    def join(line: Sequence[str]) -> str:
        parts = ["  ".join(line[i].ljust(widths[i]) for i in indices) for _, indices in sections]
        return " | ".join(parts).rstrip()

    spans = [sum(widths[i] for i in indices) + 2 * (len(indices) - 1) for _, indices in sections]
    text = [" | ".join(name.ljust(span) for (name, _), span in zip(sections, spans, strict=True)).rstrip()]
    text += [join(titles), *(join(line) for line in cells)]
    if partly_capped:
        text.append(PARTLY_CAPPED_NOTE.format(cap=cap_db))
    return text


def format_table(report: dict[str, object]) -> str:
    """A plain-text table: one row per group, the paper's columns, headed by what the numbers mean (secrets masked)."""
    groups: dict[str, dict[str, object]] = report["groups"]  # type: ignore[assignment]
    rows = [([name, str(summary.get("n", 0))], summary) for name, summary in groups.items()]
    text = [
        f"protocol {report['protocol_name']} | {report['resolution']}x{report['resolution']} | "
        f"LPIPS: {report['lpips']} | CLIP: {report['clip_model']} | judge: {report['judge']}",
        *format_grouped_table(["group", "n"], rows, float(report["psnr_cap_db"])),  # type: ignore[arg-type]
    ]
    counts = report["counts"]
    text.append(
        f"records {counts['records']}, scored {counts['scored']}, missing {counts['missing']}, "  # type: ignore[index]
        f"unexpected {counts['unexpected']}, skipped {counts['skipped']}"
    )  # type: ignore[index]
    return for_console(redact("\n".join(text)))


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return redact(value)  # a judge's error that echoed its API key
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def write_json(report: dict[str, object], path: Path) -> None:
    """Write the report as strict JSON (non-finite floats become strings, secrets masked), atomically."""
    try:
        with atomic_write(path, "w", encoding="utf-8") as stream:
            stream.write(json.dumps(_json_safe(report), indent=2) + "\n")
    except OSError as error:
        raise OutputNotWritten(f"cannot write the report {path}: {explain(error)}") from error


def write_csv(rows: Sequence[dict[str, object]], path: Path, header: dict[str, object]) -> None:
    """Write one line per edit; a first comment line names protocol, resolution, backbones, judge (atomically)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    try:
        with atomic_write(path, "w", encoding="utf-8") as stream:  # newline="" as the csv module wants
            stream.write("# " + "; ".join(f"{key}={redact(str(value))}" for key, value in header.items()) + "\n")
            writer = csv.DictWriter(stream, fieldnames=keys)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: "" if row.get(key) is None else redact_value(row.get(key)) for key in keys})
    except OSError as error:
        raise OutputNotWritten(f"cannot write the report {path}: {explain(error)}") from error
