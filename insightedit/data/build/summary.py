"""After the steps: the manifest of usable records, per-step counts, failures and the filter's pass rate.

The records are read back with the official-layout reader (:func:`~insightedit.data.advancededit.load_advancededit`,
steps 3–5 merged per record); an image contributes when the last requested step is done for it, and
when that step is 5 only its records that passed the filter. They are written to ``manifest.jsonl``
(paths relative to the output folder), which :func:`~insightedit.data.records.load_records`,
``AdvancedEditDataModule``, ``insightedit data check`` and ``insightedit data optimize`` read first.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from insightedit.data.advancededit import load_advancededit
from insightedit.data.build.config import STEP_NAMES, BuildConfig
from insightedit.data.build.store import SUMMARY_NAME, BuildStore, atomic_write_json, step_label
from insightedit.data.records import MANIFEST_NAME, TASK_TYPES, EditRecord, write_manifest
from insightedit.redaction import redact


def _step_counts(store: BuildStore, ids: list[str]) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]]]:
    counts: dict[str, dict[str, int]] = {}
    failures: list[dict[str, Any]] = []
    for number in STEP_NAMES:
        tally: Counter[str] = Counter()
        for image_id in ids:
            if store.is_done(number, image_id):
                tally["done"] += 1
            elif (failure := store.failure(number, image_id)) is not None:
                tally["failed"] += 1
                reason = redact(str(failure["reason"]))  # also failures written before secrets were masked
                failures.append({"step": step_label(number), "image_id": image_id, "reason": reason})
            elif number > 1 and not store.is_done(number - 1, image_id):
                tally["blocked"] += 1
            else:
                tally["pending"] += 1
        counts[step_label(number)] = {key: tally.get(key, 0) for key in ("done", "failed", "blocked", "pending")}
    return counts, failures


def _final_records(store: BuildStore, ids: list[str], final: int) -> tuple[list[EditRecord], dict[str, Any], int]:
    """The usable records, the filter's tally and the number of records the reader rejected."""
    tally = {"scored": 0, "passed": 0, "unscored": 0}
    finished = {image_id for image_id in ids if store.is_done(final, image_id)}
    if final < 3 or not finished:
        return [], tally, 0
    loaded = load_advancededit(store.root, pipeline=True)
    records = []
    for record in loaded.records:
        if record.source_id not in finished:
            continue
        if final == 5:
            score = record.extra.get("viescore") or {}
            tally["scored" if score.get("overall/10") is not None else "unscored"] += 1
            if not score.get("passed"):
                continue
            tally["passed"] += 1
        records.append(record)
    return records, tally, len(loaded.bad)


def finalize(
    store: BuildStore, ids: list[str], steps: list[int], config: BuildConfig, outcomes: dict[str, Counter[str]]
) -> dict[str, Any]:
    """Write ``manifest.jsonl`` and ``summary.json``; return the summary (call on one rank, after all ranks)."""
    store.remove_stale_temporaries()
    final = max(steps)
    counts, failures = _step_counts(store, ids)
    records, tally, unreadable = _final_records(store, ids, final)
    manifest = store.root / MANIFEST_NAME
    temporary = store.root / f".{MANIFEST_NAME}.writing"
    write_manifest(records, temporary)
    os.replace(temporary, manifest)
    per_type = Counter(record.task_type for record in records)
    summary: dict[str, Any] = {
        "images": len(ids),
        "steps_run": steps,
        "steps": counts,
        "this_run": {label: dict(sorted(c.items())) for label, c in outcomes.items()},
        "failures": failures,
        "records": {"total": len(records), **{task: per_type.get(task, 0) for task in TASK_TYPES}},
        "unreadable_records": unreadable,
        "manifest": MANIFEST_NAME,
        "filtered": final == 5,
    }
    if final == 5:
        scored = tally["scored"]
        summary["filter"] = {
            **tally, "threshold": config.steps.filter.threshold, "backend": config.steps.filter.backend,
            "pass_rate": round(tally["passed"] / scored, 4) if scored else None,
        }  # fmt: skip
    atomic_write_json(store.root / SUMMARY_NAME, summary)
    return summary


def format_summary(summary: dict[str, Any], root: str, max_listed: int = 20) -> str:
    """The summary as lines for the terminal (secrets masked)."""
    lines = [f"built {root}: {summary['images']} images, steps {','.join(map(str, summary['steps_run']))}"]
    for label, counts in summary["steps"].items():
        now = summary["this_run"].get(label)
        ran = f"  (this run: {', '.join(f'{k} {v}' for k, v in now.items())})" if now else ""
        lines.append(f"  step {label:<10} " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ran)
    if "filter" in summary:
        f = summary["filter"]
        rate = "n/a" if f["pass_rate"] is None else f"{f['pass_rate']:.1%}"
        lines.append(
            f"filter: {f['passed']} of {f['scored']} scored records passed ({rate}, threshold {f['threshold']}"
            f" on O/10, judge {f['backend']}); {f['unscored']} unscored"
        )
    r = summary["records"]
    kind = "filtered" if summary["filtered"] else "unfiltered"
    lines.append(
        f"records: {r['total']} {kind} ({', '.join(f'{t} {r[t]}' for t in TASK_TYPES)}) in {summary['manifest']}"
    )
    if summary["unreadable_records"]:
        lines.append(f"unreadable records (left out): {summary['unreadable_records']}")
    if summary["failures"]:
        lines.append(f"failures: {len(summary['failures'])} (in failures/; rerun with --retry-failed to retry)")
        lines += [f"  {f['step']} {f['image_id']}: {f['reason']}" for f in summary["failures"][:max_listed]]
    return redact("\n".join(lines))
