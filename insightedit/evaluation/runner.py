"""Score edits with a protocol: the engine behind ``insightedit evaluate`` and ``insightedit test``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from insightedit.evaluation.clip_score import DEFAULT_CLIP_MODEL, ClipScorer
from insightedit.evaluation.collect import Collection, collect
from insightedit.evaluation.lpips import LpipsMetric, build_lpips
from insightedit.evaluation.metrics import PSNR_CAP_DB
from insightedit.evaluation.protocols import (
    EvalSample,
    Protocol,
    clip_crop,
    get_protocol,
    pixel_scores,
    prepare,
)
from insightedit.evaluation.report import aggregate_groups
from insightedit.evaluation.viescore.scorer import VIEScoreItem, VIEScorer
from insightedit.image_reader import UnreadableImage


@dataclass
class EvalOptions:
    """How to score: protocol and overrides, metric backends (``None`` = not computed) and device."""

    protocol: str
    resolution: int | None = None
    ssim: str | None = None
    lpips: str = "lpips"
    lpips_net: str | None = None
    lpips_weights: str | Path | None = None
    clip_model: str | Path | None = DEFAULT_CLIP_MODEL
    device: str = "cpu"


@dataclass
class Scorers:
    """The loaded metric backends; ``None`` entries are reported as not computed."""

    lpips: LpipsMetric | None = None
    clip: ClipScorer | None = None
    vie: VIEScorer | None = None


def load_scorers(protocol: Protocol, options: EvalOptions, vie: VIEScorer | None = None) -> Scorers:
    """Load LPIPS and CLIP as the options say (raises ``UserError`` naming any missing weights)."""
    lpips = build_lpips(options.lpips, protocol.lpips_net, options.lpips_weights, options.device)
    clip = None
    if options.clip_model:
        clip = ClipScorer.from_pretrained(options.clip_model, options.device, protocol.clip_preprocessing)
    return Scorers(lpips=lpips, clip=clip, vie=vie)


def score_samples(
    samples: Sequence[EvalSample], protocol: Protocol, scorers: Scorers, skipped: dict[str, str] | None = None
) -> list[dict[str, object]]:
    """One row per sample: id, group, subset and every metric the scorers provide.

    With ``skipped``, a sample whose image or mask the reader refuses goes there (id → the reader's one-line
    reason) instead of raising :class:`UnreadableImage`.
    """
    rows: list[dict[str, object]] = []
    vie_items: list[VIEScoreItem] = []
    for sample in samples:
        try:
            prepared = prepare(sample, protocol)
        except UnreadableImage as error:
            if skipped is None:
                raise
            skipped[sample.id] = str(error)
            continue
        row: dict[str, object] = {"id": sample.id, "group": sample.group, "subset": sample.subset}
        row.update(pixel_scores(prepared, protocol, scorers.lpips))
        if scorers.clip is not None:
            crop = clip_crop(prepared)
            row["clip"] = None if crop is None else scorers.clip.score(crop, sample.caption)
            if crop is None:
                row["clip_error"] = "empty mask: no bounding box to crop"
        vie_items.append(VIEScoreItem(prepared.source, prepared.edited, sample.instruction))
        rows.append(row)
    if scorers.vie is not None:
        for row, result in zip(rows, scorers.vie.score_many(vie_items), strict=True):
            row.update(
                viescore_SC=result.sc,
                viescore_PQ=result.pq,
                viescore_O=result.overall,
                viescore_sc_scores=result.sc_scores,
                viescore_pq_scores=result.pq_scores,
            )
            errors = [f"SC: {result.sc_error}"] if result.sc_error else []
            errors += [f"PQ: {result.pq_error}"] if result.pq_error else []
            row["viescore_error"] = "; ".join(errors) or None
    return rows


def build_report(
    protocol: Protocol,
    scorers: Scorers,
    rows: list[dict[str, object]],
    collection: Collection,
    data_root: str,
    pred_dir: str,
) -> dict[str, object]:
    """The full report: what the numbers mean, group means, per-edit rows and every unscored record."""
    return {
        "protocol_name": protocol.name,
        "resolution": protocol.resolution,
        "lpips": scorers.lpips.label if scorers.lpips else "not computed",
        "lpips_details": scorers.lpips.details if scorers.lpips else None,
        "clip_model": scorers.clip.name if scorers.clip else "not computed",
        "judge": scorers.vie.label if scorers.vie else "not computed",
        "psnr_cap_db": PSNR_CAP_DB,
        "protocol": protocol.describe(),
        "data": data_root,
        "predictions": pred_dir,
        "counts": {
            "records": collection.n_records,
            "scored": len(rows),
            "missing": len(collection.missing),
            "unexpected": len(collection.unexpected),
            "skipped": len(collection.skipped),
        },
        "missing": collection.missing,
        "unexpected": collection.unexpected,
        "skipped": collection.skipped,
        "notes": collection.notes,
        "groups": aggregate_groups(rows),
        "rows": rows,
    }


def evaluate(
    data_root: str | Path,
    pred_dir: str | Path,
    options: EvalOptions,
    vie: VIEScorer | None = None,
    layout: str = "ids",
) -> dict[str, object]:
    """Pair predictions with a benchmark, score them with the protocol and return the report."""
    lpips_net = options.lpips_net
    if options.lpips == "stlpips" and lpips_net is None:
        lpips_net = "alex"  # ST-LPIPS ships AlexNet and VGG only
    protocol = get_protocol(options.protocol, options.resolution, lpips_net, options.ssim)
    collection = collect(protocol.name, data_root, pred_dir, layout)
    scorers = load_scorers(protocol, options, vie)
    rows = score_samples(collection.samples, protocol, scorers, skipped=collection.skipped)
    return build_report(protocol, scorers, rows, collection, str(data_root), str(pred_dir))
