"""Aggregate per-edit rows into group means, print the table, write JSON and CSV.

Every mean is taken over the edits where the metric exists; ``n`` columns say how many. PSNR means use
the capped per-image values (see ``PSNR_CAP_DB``) and ``psnr_n_capped`` counts the capped images.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from insightedit.atomic_write import OutputNotWritten, atomic_write, explain
from insightedit.redaction import redact, redact_value

METRICS: tuple[str, ...] = ("clip", "psnr", "ssim", "lpips", "psnr_target", "ssim_target", "lpips_target")
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
    for capped in ("psnr_capped", "psnr_target_capped"):
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


def _cell(value: object, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(report: dict[str, object]) -> str:
    """A plain-text table: one row per group, the paper's columns, headed by what the numbers mean (secrets masked)."""
    groups: dict[str, dict[str, object]] = report["groups"]  # type: ignore[assignment]
    columns = [
        ("n", "n", 0),
        ("viescore_O/10", "VIE O/10", 3),
        ("viescore_SC", "SC", 2),
        ("viescore_PQ", "PQ", 2),
        ("clip", "CLIP", 3),
        ("psnr", "PSNR", 3),
        ("ssim", "SSIM", 3),
        ("lpips", "LPIPS", 3),
        ("psnr_target", "PSNR-tgt", 3),
        ("ssim_target", "SSIM-tgt", 3),
        ("lpips_target", "LPIPS-tgt", 3),
    ]
    present = [c for c in columns if any(c[0] in summary for summary in groups.values())]
    header = ["group"] + [title for _, title, _ in present]
    lines = [
        [name] + [_cell(summary.get(key), digits) for key, _, digits in present] for name, summary in groups.items()
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    text = [
        f"protocol {report['protocol_name']} | {report['resolution']}x{report['resolution']} | "
        f"LPIPS: {report['lpips']} | CLIP: {report['clip_model']} | judge: {report['judge']}",
        "  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)),
    ]
    text += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in lines]
    counts = report["counts"]
    text.append(
        f"records {counts['records']}, scored {counts['scored']}, missing {counts['missing']}, "  # type: ignore[index]
        f"unexpected {counts['unexpected']}, skipped {counts['skipped']}"
    )  # type: ignore[index]
    return redact("\n".join(text))


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
