"""``insightedit test``: score a model's edits of the evaluation set beside the identity edit, in one run.

The system edits each test batch; this module turns the tensors into the protocol's samples, scores
them with the same engine as ``insightedit evaluate`` and, at the end, lays the means out like the
paper's table: one row per system (this checkpoint, and the identity edit ``edited = source`` as the
floor every real edit must clear), the paper's columns, the protocol and backbones named above it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from insightedit.evaluation.protocols import EvalSample, get_protocol
from insightedit.evaluation.report import aggregate_groups, write_csv, write_json
from insightedit.evaluation.runner import EvalOptions, load_scorers, score_samples

PAPER_COLUMNS = (
    ("viescore_O/10", "VIEScore", 3),
    ("clip", "CLIPScore", 3),
    ("psnr", "PSNR", 3),
    ("ssim", "SSIM", 3),
    ("lpips", "LPIPS", 3),
    ("psnr_target", "PSNR-tgt", 3),
    ("ssim_target", "SSIM-tgt", 3),
)


@dataclass
class TestSettings:
    """How ``insightedit test`` edits and scores (the ``evaluation:`` section of a system config).

    Args:
        protocol: ``advancededit`` or ``reason_edit`` (see docs/evaluation.md).
        resolution: override of the protocol's resolution (the tiny twin's 32 px data is upsampled to it).
        lpips: ``lpips`` (torchmetrics, needs ``lpips_weights``), ``stlpips`` (shift-tolerant, ships its
            weights; labelled as not the paper's LPIPS) or ``none``.
        clip_model: a local CLIP folder or hub id for CLIPScore; ``None`` leaves CLIPScore out.
        num_inference_steps, text_guidance, image_guidance, image_scale: sampling settings.
        seed: the noise of batch ``i`` comes from ``seed + i``, so reruns give the same numbers.
        out_dir: where ``test_report.json`` and ``test_report.csv`` go (default: the run's log dir).
        save_edits: also write each edit as ``<out_dir>/edits/<record id>.png`` (the layout
            ``insightedit evaluate --pred-dir`` reads, e.g. to add VIEScore with a judge later).
    """

    protocol: str = "advancededit"
    resolution: int | None = None
    lpips: str = "stlpips"
    lpips_net: str | None = None
    lpips_weights: str | None = None
    clip_model: str | None = None
    num_inference_steps: int = 20
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    image_scale: float | None = None
    seed: int = 0
    out_dir: str | None = None
    save_edits: bool = True


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → an RGB PIL image (rounded to 8 bits, as a saved edit would be)."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


class EditTestRun:
    """Collects scored rows per system and writes the report."""

    def __init__(self, settings: TestSettings) -> None:
        self.settings = settings
        lpips_net = settings.lpips_net
        if settings.lpips == "stlpips" and lpips_net is None:
            lpips_net = "alex"  # ST-LPIPS ships AlexNet and VGG only
        self.protocol = get_protocol(settings.protocol, settings.resolution, lpips_net)
        options = EvalOptions(
            protocol=settings.protocol,
            lpips=settings.lpips,
            lpips_net=lpips_net,
            lpips_weights=settings.lpips_weights,
            clip_model=settings.clip_model,
        )
        self.scorers = load_scorers(self.protocol, options)
        self.rows: dict[str, list[dict[str, object]]] = {}
        self.edits_dir: Path | None = None  # set by the caller once the output folder is known

    def add(self, system: str, batch: dict[str, Any], edited: torch.Tensor) -> None:
        """Score ``edited`` (B, 3, H, W) in [-1, 1] against the batch's source, target and mask."""
        samples = []
        for i in range(edited.shape[0]):
            mask = (batch["mask"][i, 0].detach().cpu().numpy() > 0.5).astype(np.uint8) * 255
            samples.append(
                EvalSample(
                    id=str(batch["record_id"][i]),
                    group="all",
                    subset=str(batch["task_type"][i]),
                    source=to_pil(batch["source"][i]),
                    edited=to_pil(edited[i]),
                    mask=mask,
                    instruction=str(batch["instruction"][i]),
                    caption=str(batch["target_caption"][i]),
                    target=to_pil(batch["target"][i]),
                )
            )
        if self.edits_dir is not None and system == "this checkpoint":
            for sample in samples:
                path = self.edits_dir / f"{sample.id}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                sample.edited.save(path)  # type: ignore[union-attr]
        rows = score_samples(samples, self.protocol, self.scorers)
        for row in rows:
            row["system"] = system
        self.rows.setdefault(system, []).extend(rows)

    def merge(self, other_rows: list[dict[str, list[dict[str, object]]]]) -> None:
        """Add the rows other ranks collected (each a ``{system: rows}`` map)."""
        for rows_by_system in other_rows:
            for system, rows in rows_by_system.items():
                self.rows.setdefault(system, []).extend(rows)

    def report(self, checkpoint: str | None) -> dict[str, object]:
        """Settings, protocol, per-system group means and every row."""
        return {
            "checkpoint": checkpoint,
            "protocol_name": self.protocol.name,
            "resolution": self.protocol.resolution,
            "lpips": self.scorers.lpips.label if self.scorers.lpips else "not computed",
            "clip_model": self.scorers.clip.name if self.scorers.clip else "not computed",
            "judge": "not computed",
            "protocol": self.protocol.describe(),
            "settings": asdict(self.settings),
            "systems": {system: aggregate_groups(rows) for system, rows in self.rows.items()},
            "rows": [row for rows in self.rows.values() for row in rows],
        }

    def table(self, report: dict[str, object]) -> str:
        """The paper's layout: a row per system (pooled), then per task type."""
        systems: dict[str, dict[str, dict[str, object]]] = report["systems"]  # type: ignore[assignment]
        lines = [
            f"protocol {report['protocol_name']} | {report['resolution']}x{report['resolution']} | "
            f"LPIPS: {report['lpips']} | CLIP: {report['clip_model']} | VIEScore judge: {report['judge']}"
        ]
        header = ["system", "group", "n"] + [title for _, title, _ in PAPER_COLUMNS]
        body = []
        for system, groups in systems.items():
            for group, summary in groups.items():
                cells = [system, group.replace("subset:", ""), str(summary.get("n", 0))]
                for key, _, digits in PAPER_COLUMNS:
                    value = summary.get(key)
                    cells.append("n/a" if value is None else f"{float(value):.{digits}f}")  # type: ignore[arg-type]
                body.append(cells)
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines.append("  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
        return "\n".join(lines)

    def write(self, report: dict[str, object], directory: Path) -> tuple[Path, Path]:
        """``test_report.json`` and ``test_report.csv`` in ``directory``."""
        json_path, csv_path = directory / "test_report.json", directory / "test_report.csv"
        write_json(report, json_path)
        header = {k: report[k] for k in ("protocol_name", "resolution", "lpips", "clip_model", "judge")}
        write_csv(report["rows"], csv_path, header)  # type: ignore[arg-type]
        return json_path, csv_path
