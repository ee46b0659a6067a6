"""The zoo comparison over data seeds: per-row mean and seed-to-seed spread, the paper's orderings, the target.

:mod:`zoo` scores every row once per data seed as ``{row: {phrasing: {group: {metric: value}}}}`` (group:
``all`` or a task type). Here those per-seed tables become one summary (each value's per-seed values,
mean and spread = max − min over the seeds, ``|a − b|`` for two), and the summary is read against the
issue's claims:

* an **ordering** ``A > B`` *holds beyond the spread* when A's mean beats B's by more than the larger of
  the two rows' seed-to-seed spreads (in the metric's better direction); by less, it holds (or is
  reversed) *within the spread*: the seeds cannot tell the rows apart;
* the **target**: InsightEdit's in-mask PSNR (templated) beats the identity edit's by ≥ 3 dB on each
  task, and its PSNR outside the mask (the background, source vs edit) is ≥ 30 dB, on the seeds' means.

Pure arithmetic and text, no torch: the tests feed it hand-made numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PSNR_CAP_DB = 100.0  # insightedit.evaluation.metrics.PSNR_CAP_DB: identical images (shown as ∞)
TASKS = ("remove", "add", "replace")
PHRASINGS = ("templated", "reasoning")
IDENTITY = "identity (output = source)"
INSIGHTEDIT, NO_IAA = "InsightEdit", "InsightEdit w/o IAA"
SMARTEDIT, PIX2PIX = "SmartEdit", "InstructPix2Pix"
TARGET_GAIN_DB, TARGET_BACKGROUND_DB = 3.0, 30.0

Scores = dict[str, dict[str, dict[str, dict[str, Any]]]]  # row -> phrasing -> group -> metric -> value


@dataclass(frozen=True)
class Stat:
    """One value over the seeds: the per-seed values (seed order), their mean and spread (max − min)."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        """The mean over the seeds."""
        return sum(self.values) / len(self.values)

    @property
    def spread(self) -> float:
        """max − min over the seeds (``|a − b|`` for two; 0 for one)."""
        return max(self.values) - min(self.values)

    def as_dict(self) -> dict[str, Any]:
        """``{"values", "mean", "spread"}`` for the JSON results."""
        return {"values": list(self.values), "mean": self.mean, "spread": self.spread}


Summary = dict[str, dict[str, dict[str, dict[str, Stat]]]]  # row -> phrasing -> group -> metric -> Stat


def summarize(per_seed: dict[int, Scores]) -> Summary:
    """Each row's metrics over the seeds (a metric missing, or ``None``, in any seed is left out)."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    summary: Summary = {}
    for row, phrasings in first.items():
        if not all(row in per_seed[s] for s in seeds):
            continue
        for phrasing, groups in phrasings.items():
            for group, metrics in groups.items():
                for metric in metrics:
                    values = [per_seed[s][row].get(phrasing, {}).get(group, {}).get(metric) for s in seeds]
                    if all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                        target = summary.setdefault(row, {}).setdefault(phrasing, {}).setdefault(group, {})
                        target[metric] = Stat(tuple(float(v) for v in values))  # type: ignore[arg-type]
    return summary


def as_json(summary: Summary) -> dict[str, Any]:
    """The summary as plain dicts."""
    return {
        row: {p: {g: {m: s.as_dict() for m, s in ms.items()} for g, ms in gs.items()} for p, gs in ps.items()}
        for row, ps in summary.items()
    }


def stat(summary: Summary, row: str, phrasing: str, group: str, metric: str) -> Stat | None:
    """One value of the summary, ``None`` when not measured."""
    return summary.get(row, {}).get(phrasing, {}).get(group, {}).get(metric)


# ----------------------------------------------------------------------------------------- orderings
@dataclass(frozen=True)
class Comparison:
    """``better > worse`` on one metric: the margin (in the better direction) against the larger spread."""

    better: str
    worse: str
    margin: float
    spread: float

    @property
    def verdict(self) -> str:
        """``holds`` / ``reversed``, ``beyond`` / ``within`` the spread."""
        side = "holds" if self.margin > 0 else "reversed"
        return f"{side} {'beyond' if abs(self.margin) > self.spread else 'within'} the spread"

    @property
    def beyond(self) -> bool:
        """Whether the ordering holds by more than the larger spread."""
        return self.margin > self.spread


@dataclass(frozen=True)
class Claim:
    """An ordering the paper reports: ``rows[0] > rows[1] > ...`` on ``metric`` of ``phrasing``/``group``."""

    name: str
    rows: tuple[str, ...]
    phrasing: str
    metric: str
    higher_is_better: bool = True
    group: str = "all"
    paper: str = ""


CLAIMS: tuple[Claim, ...] = (
    Claim("IAA, background PSNR", (INSIGHTEDIT, NO_IAA), "templated", "psnr", paper="22.35 without, 22.87 with"),
    Claim(
        "IAA, background LPIPS", (INSIGHTEDIT, NO_IAA), "templated", "lpips", False, paper="0.095 without, 0.071 with"
    ),
    Claim("IAA, in-mask PSNR", (INSIGHTEDIT, NO_IAA), "templated", "psnr_in_mask"),
    Claim(
        "reasoning, in-mask PSNR",
        (INSIGHTEDIT, SMARTEDIT, PIX2PIX),
        "reasoning",
        "psnr_in_mask",
        paper="Reason-Edit reasoning VIEScore: InsightEdit 0.893, SmartEdit 0.835",
    ),
    Claim("reasoning, PSNR to target", (INSIGHTEDIT, SMARTEDIT, PIX2PIX), "reasoning", "psnr_target"),
)


def compare(summary: Summary, claim: Claim) -> list[Comparison] | None:
    """Each adjacent pair of ``claim.rows``; ``None`` when a row or the metric was not measured."""
    stats = [stat(summary, row, claim.phrasing, claim.group, claim.metric) for row in claim.rows]
    if any(s is None for s in stats):
        return None
    sign = 1.0 if claim.higher_is_better else -1.0
    pairs = []
    for i in range(len(claim.rows) - 1):
        better, worse = stats[i], stats[i + 1]
        assert better is not None and worse is not None
        margin = sign * (better.mean - worse.mean)
        pairs.append(Comparison(claim.rows[i], claim.rows[i + 1], margin, max(better.spread, worse.spread)))
    return pairs


def ordering_lines(summary: Summary, claims: tuple[Claim, ...] = CLAIMS) -> list[dict[str, Any]]:
    """Each claim read on the summary: its pairs' verdicts and whether the whole ordering holds beyond the spread."""
    lines = []
    for claim in claims:
        pairs = compare(summary, claim)
        entry: dict[str, Any] = {
            "claim": claim.name,
            "ordering": " > ".join(claim.rows),
            "phrasing": claim.phrasing,
            "metric": claim.metric,
            "higher_is_better": claim.higher_is_better,
            "paper": claim.paper,
        }
        if pairs is None:
            entry.update(holds_beyond_spread=None, pairs=[], text="not measured (a row is missing)")
        else:
            entry.update(
                holds_beyond_spread=all(p.beyond for p in pairs),
                pairs=[
                    {"better": p.better, "worse": p.worse, "margin": p.margin, "spread": p.spread, "verdict": p.verdict}
                    for p in pairs
                ],
                text="; ".join(
                    f"{p.better} vs {p.worse}: {p.margin:+.3g} (spread {p.spread:.3g}) {p.verdict}" for p in pairs
                ),
            )
        lines.append(entry)
    return lines


# ------------------------------------------------------------------------------------------ target
def target_check(summary: Summary, row: str = INSIGHTEDIT) -> dict[str, Any]:
    """``row`` vs the identity edit, templated: ≥ 3 dB in the mask on each task, background ≥ 30 dB (means)."""
    tasks: dict[str, Any] = {}
    for task in TASKS:
        edit = stat(summary, row, "templated", task, "psnr_in_mask")
        floor = stat(summary, IDENTITY, "templated", task, "psnr_in_mask")
        if edit is None or floor is None:
            tasks[task] = {"met": None}
            continue
        gain = edit.mean - floor.mean
        tasks[task] = {"psnr_in_mask": edit.mean, "identity": floor.mean, "gain": gain, "met": gain >= TARGET_GAIN_DB}
    background = stat(summary, row, "templated", "all", "psnr")
    met_background = None if background is None else background.mean >= TARGET_BACKGROUND_DB
    verdicts = [t["met"] for t in tasks.values()] + [met_background]
    return {
        "row": row,
        "tasks": tasks,
        "background": None if background is None else background.mean,
        "background_met": met_background,
        "met": None if None in verdicts else all(verdicts),
    }


def target_text(check: dict[str, Any]) -> str:
    """One line: each task's gain over the identity edit and the background, and whether the target is met."""
    parts = []
    for task, t in check["tasks"].items():
        parts.append(f"{task} not measured" if t["met"] is None else f"{task} {t['gain']:+.1f} dB")
    background = "not measured" if check["background"] is None else f"{cell(check['background'], 1)} dB"
    verdict = {True: "met", False: "NOT met", None: "not measured"}[check["met"]]
    return (
        f"Target ({check['row']}, templated, mean over seeds: ≥ +{TARGET_GAIN_DB:g} dB over the identity edit in the "
        f"mask on each task, background ≥ {TARGET_BACKGROUND_DB:g} dB): {', '.join(parts)}; background {background}"
        f" → {verdict}."
    )


# ------------------------------------------------------------------------------------------ tables
def cell(value: float | None, digits: int = 2) -> str:
    """A number: ∞ at the PSNR cap, n/a when not computed."""
    if value is None:
        return "n/a"
    return "∞" if value >= PSNR_CAP_DB else f"{value:.{digits}f}"


def seeds_cell(s: Stat | None, digits: int = 1) -> str:
    """``mean (seed a / seed b)``; just the mean for one seed or when all are ∞; ``–`` when not measured."""
    if s is None:
        return "–"
    if len(s.values) == 1 or min(s.values) >= PSNR_CAP_DB:  # one seed, or identical images in every seed
        return cell(s.mean, digits)
    return f"{cell(s.mean, digits)} ({' / '.join(cell(v, digits) for v in s.values)})"


COLUMNS: tuple[tuple[str, str, str, int], ...] = (  # header, group, metric, digits
    *((f"{t} in ↑", t, "psnr_in_mask", 1) for t in TASKS),
    *((f"{t} out ↑", t, "psnr", 1) for t in TASKS),
    ("all in ↑", "all", "psnr_in_mask", 1),
    ("all out ↑", "all", "psnr", 1),
    ("LPIPS ↓", "all", "lpips", 3),
)


def markdown(summary: Summary, seeds: list[int], lpips_label: str) -> str:
    """A table per phrasing: rows × (in-mask / outside PSNR per task, overall, LPIPS), then orderings and target."""
    lines = [
        f"Each cell: mean over the data seeds ({', '.join(map(str, seeds))}) and, in brackets, each seed's value; "
        "the seed-to-seed spread is their difference. *in*: PSNR (dB) of the edit to the target inside the edit "
        "mask (did the edit happen); *out*: PSNR of the edit to the source outside the mask (background kept; "
        f"∞ = identical); LPIPS = {lpips_label}, outside the mask.",
    ]
    for phrasing in PHRASINGS:
        lines += ["", f"**{phrasing} instructions**", ""]
        lines.append("| row | " + " | ".join(c[0] for c in COLUMNS) + " |")
        lines.append("|---|" + "---|" * len(COLUMNS))
        for row, phrasings in summary.items():
            if phrasing in phrasings:
                cells = [seeds_cell(stat(summary, row, phrasing, g, m), d) for _, g, m, d in COLUMNS]
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "The paper's orderings (holds *beyond the spread*: the means differ by more than the larger "
              "seed-to-seed spread of the two rows):", ""]  # fmt: skip
    for entry in ordering_lines(summary):
        paper = f" (paper: {entry['paper']})" if entry["paper"] else ""
        head = f"- {entry['claim']}, {entry['ordering']} on {entry['phrasing']} {entry['metric']}{paper}"
        if entry["holds_beyond_spread"] is None:
            lines.append(f"{head}: {entry['text']}.")
            continue
        verdict = "**holds beyond the spread**" if entry["holds_beyond_spread"] else "does not hold beyond the spread"
        lines.append(f"{head}: {verdict}. {entry['text']}.")
    lines += ["", target_text(target_check(summary))]
    return "\n".join(lines)
