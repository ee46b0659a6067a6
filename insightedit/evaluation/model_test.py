"""``insightedit test``: score a model's edits of the evaluation set beside the identity edit, in one run.

The system edits each test batch; this module turns the tensors into the protocol's samples, scores
them with the same engine as ``insightedit evaluate`` and, at the end, lays the means out like the
paper's table: one row per system (this checkpoint, and the identity edit ``edited = source`` as the
floor every real edit must clear) pooled and per task type, the columns grouped by what they compare
(the source outside the mask, the target), the protocol and backbones named above it, the in-mask PSNR
against the identity edit and a note on reading that comparison below it.
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from insightedit.evaluation.metrics import PSNR_CAP_DB
from insightedit.evaluation.protocols import EvalSample, get_protocol
from insightedit.evaluation.report import aggregate_groups, for_console, format_grouped_table, write_csv, write_json
from insightedit.evaluation.runner import EvalOptions, load_scorers, score_samples

IDENTITY_NOTE = (
    "note: the identity edit (output = source) keeps the background perfectly and the edit region is small, so it "
    "scores high on whole-image PSNR/SSIM to the target; a model below it there is not worse than doing nothing: "
    "in-mask PSNR to the target measures the edit."
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
            "psnr_cap_db": PSNR_CAP_DB,
            "protocol": self.protocol.describe(),
            "settings": asdict(self.settings),
            "systems": {system: aggregate_groups(rows) for system, rows in self.rows.items()},
            "rows": [row for rows in self.rows.values() for row in rows],
        }

    def table(self, report: dict[str, object]) -> str:
        """The paper's layout: pooled rows, then per task type, each with every system; the in-mask headline."""
        systems: dict[str, dict[str, dict[str, object]]] = report["systems"]  # type: ignore[assignment]
        lines = [
            f"protocol {report['protocol_name']} | {report['resolution']}x{report['resolution']} | "
            f"LPIPS: {report['lpips']} | CLIP: {report['clip_model']} | VIEScore judge: {report['judge']}"
        ]
        groups = dict.fromkeys(group for summaries in systems.values() for group in summaries)
        rows = [
            ([system, group.replace("subset:", ""), str(summaries[group].get("n", 0))], summaries[group])
            for group in groups
            for system, summaries in systems.items()
            if group in summaries
        ]
        lines += format_grouped_table(["system", "group", "n"], rows, float(report["psnr_cap_db"]))  # type: ignore[arg-type]
        headline = in_mask_headline(systems)
        if headline:
            lines.append(headline)
        if "identity edit" in systems:
            lines.append(textwrap.fill(IDENTITY_NOTE, width=110, subsequent_indent="      "))
        return for_console("\n".join(lines))

    def outputs(self, json_path: Path, csv_path: Path, loggers: list[Any]) -> str:
        """Where this run wrote: the edits, the report files and each logger's run, one line each."""
        lines = []
        if self.edits_dir is not None:
            count = len(self.rows.get("this checkpoint", []))
            lines.append(
                f"edits:  {count} PNGs of this checkpoint in {self.edits_dir} "
                "(`insightedit evaluate --pred-dir` reads them)"
            )
        lines.append(f"report: {json_path} and {csv_path}")
        lines += [f"{name}: {where}" for name, where in (logger_location(logger) for logger in loggers)]
        if not loggers:
            lines.append("logger: none (trainer.logger=false): the means are in the report only")
        return "\n".join(lines)

    def write(self, report: dict[str, object], directory: Path) -> tuple[Path, Path]:
        """``test_report.json`` and ``test_report.csv`` in ``directory``."""
        json_path, csv_path = directory / "test_report.json", directory / "test_report.csv"
        write_json(report, json_path)
        header = {k: report[k] for k in ("protocol_name", "resolution", "lpips", "clip_model", "judge", "psnr_cap_db")}
        write_csv(report["rows"], csv_path, header)  # type: ignore[arg-type]
        return json_path, csv_path


def in_mask_headline(systems: dict[str, dict[str, dict[str, object]]]) -> str | None:
    """The checkpoint's pooled in-mask PSNR to the target beside the identity edit's, and the gain per task type."""
    model, identity = systems.get("this checkpoint", {}), systems.get("identity edit", {})

    def gain(group: str) -> float | None:
        ours, floor = model.get(group, {}).get("psnr_in_mask"), identity.get(group, {}).get("psnr_in_mask")
        return None if ours is None or floor is None else float(ours) - float(floor)  # type: ignore[arg-type]

    pooled = gain("all")
    if pooled is None:
        return None
    tasks = [(group.replace("subset:", ""), gain(group)) for group in model if group.startswith("subset:")]
    per_task = ", ".join(f"{task} {value:+.2f}" for task, value in tasks if value is not None)
    return (
        f"in-mask PSNR to the target: this checkpoint {float(model['all']['psnr_in_mask']):.2f} dB, "  # type: ignore[arg-type]
        f"identity edit {float(identity['all']['psnr_in_mask']):.2f} dB ({pooled:+.2f} dB"  # type: ignore[arg-type]
        + (f"; per task type {per_task})" if per_task else ")")
    )


def logger_location(logger: Any) -> tuple[str, str]:
    """A logger's name and where its run lives: a W&B run's folder (offline) or URL, else its log dir."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        run = logger.experiment
        settings = getattr(run, "settings", None)
        if getattr(run, "offline", False) and settings is not None:
            return "W&B run", f"{settings.sync_dir} (offline: `wandb sync` that folder to upload it)"
        return "W&B run", str(getattr(run, "url", None) or getattr(run, "dir", "unknown"))
    where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return f"{type(logger).__name__}", str(where)
