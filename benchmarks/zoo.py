"""The zoo compared on equal terms: every member trained the same way on the synthetic twin, scored alike.

Each member of :data:`insightedit.models.zoo.MEMBERS` is trained by the same
:class:`~insightedit.systems.editor_system.EditorSystem` in one process, from the same starting point:

1. the tiny InstructPix2Pix stand-in (``lightning_configs/tiny/instruct_pix2pix.yaml``: instruction →
   frozen text encoder → UNet, templated instructions only) trains ``--pretrain-steps`` steps, as the full
   members start from ``timbrooks/instruct-pix2pix``;
2. every member then trains ``--steps`` steps of its stage 3 with its tiny yaml's model settings
   (``lightning_configs/tiny/<member>.yaml``, InsightEdit's is ``tiny/stage3.yaml``), its UNet loaded
   from the stand-in's checkpoint (``generation.pretrained``; the InstructPix2Pix row continues the
   stand-in itself), on the same data (``tiny/stage3.yaml``'s: templated and reasoning phrasings), the
   same seed (same batches, noise and dropout draws) and the same batch size.

Then every member edits the same held-out pairs (source images never seen in training) twice, with
the templated phrasing (``remove the red circle``) and with the reasoning one, and is scored by the
``advancededit`` protocol of :mod:`insightedit.evaluation` as ``insightedit test`` scores (the yaml's
``evaluation:`` settings): PSNR, SSIM and LPIPS between source and edit *outside* the edit mask, and
PSNR / SSIM to the target over the whole image; plus the PSNR to the target *inside* the mask (did the
edit happen; computed here at the data's 32 px, data range 1, per image then averaged), per task type.
The identity edit (output = source) is the floor row.

Writes under ``--out``: ``zoo_results.json`` (command, commit, date, machine, wall time and steps per
member, every score), ``zoo_results.md`` (the tables) and ``zoo_edits.png`` (a row per held-out
example: source | each member's edit | target). Every training run and a comparison run are logged to
one offline W&B project under a shared group (``--wandb-dir``), with the test metrics as a
``wandb.Table``, so a dashboard compares them.

    python benchmarks/zoo.py --steps 2 --pretrain-steps 2 --eval-pairs 8      # smoke run
    python benchmarks/zoo.py --steps 60 --pretrain-steps 60 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont

from insightedit.data import AdvancedEditDataModule
from insightedit.evaluation.metrics import PSNR_CAP_DB
from insightedit.evaluation.model_test import EditTestRun, TestSettings
from insightedit.evaluation.report import aggregate_groups
from insightedit.models.zoo import MEMBERS, get_member
from insightedit.systems.editor_system import EditorSystem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

TASKS = ("remove", "add", "replace")
PHRASINGS = {"templated": 0.0, "reasoning": 1.0}  # held-out phrasing -> reasoning probability
ROWS = {  # the paper's row names, in the paper's order
    "instruct_pix2pix": "InstructPix2Pix",
    "mgie": "MGIE",
    "smartedit": "SmartEdit",
    "insightedit_no_iaa": "InsightEdit w/o IAA",
    "insightedit_no_bim": "InsightEdit w/o BIM",
    "insightedit": "InsightEdit",
}
IDENTITY = "identity (output = source)"
CONFIGS = Path("lightning_configs/tiny")
SHARED = CONFIGS / "stage3.yaml"  # data and evaluation settings every member shares
STAND_IN = CONFIGS / "instruct_pix2pix.yaml"


# ------------------------------------------------------------------------------------------ configs
def member_config(member: str) -> Path:
    """The tiny yaml whose model settings ``member`` trains with."""
    return SHARED if member == "insightedit" else CONFIGS / f"{member}.yaml"


def model_settings(path: Path) -> dict[str, Any]:
    """The ``model.init_args`` of a LightningCLI yaml, interpolations resolved (the foundations root)."""
    config = OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=True)
    return dict(config["model"]["init_args"])  # type: ignore[index]


def available_members(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """The members to run in the paper's order, and a note for each one left out."""
    notes: dict[str, str] = {}
    chosen = []
    for member in [m for m in ROWS if m in wanted] + [m for m in wanted if m not in ROWS]:
        module = get_member(member).builder.partition(":")[0]
        if importlib.util.find_spec(module) is None:
            notes[member] = f"skipped: {module.replace('.', '/')}.py is absent"
        elif not member_config(member).is_file():
            notes[member] = f"skipped: {member_config(member)} is absent"
        else:
            chosen.append(member)
    return chosen, notes


# ----------------------------------------------------------------------------------------- training
class StepLog(L.Callback):
    """Training loss every ``every`` steps and the wall time of the training loop."""

    def __init__(self, label: str, every: int) -> None:
        self.label, self.every = label, max(every, 1)
        self.started = 0.0
        self.curve: list[tuple[int, float, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
            elapsed = time.perf_counter() - self.started
            self.curve.append((step, loss, elapsed))
            print(f"  [{self.label}] step {step:5d}  loss {loss:.4f}  {elapsed:7.1f}s", flush=True)


class ZooSystem(EditorSystem):
    """:class:`EditorSystem` whose parameter groups include, empty, those a member's optimizer groups name but it lacks.

    Workaround: ``EditorSystem.configure_optimizers`` looks up every group of ``editor.optimizer_groups``,
    and SmartEdit and the ablations name ``mapper`` / ``bim`` there without having them (a KeyError).
    """

    def parameter_groups(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """The system's groups plus an empty one for each group an optimizer group names and the member lacks."""
        groups = super().parameter_groups()
        for members in self.editor.optimizer_groups.values():
            for group in members:
                groups.setdefault(group, {})
        return groups


def build_system(settings: dict[str, Any], seed: int) -> EditorSystem:
    """A system built under ``seed`` (the tiny twins' frozen parts have their own seed)."""
    L.seed_everything(seed, verbose=False)
    return ZooSystem(**copy.deepcopy(settings))


def fit(
    system: EditorSystem,
    data: AdvancedEditDataModule,
    steps: int,
    seed: int,
    label: str,
    logger: Any,
    max_minutes: float | None,
) -> tuple[dict[str, Any], L.Trainer]:
    """Train ``system`` for ``steps`` steps under ``seed``; the run's steps, seconds and loss curve, and the trainer."""
    log = StepLog(label, every=max(steps // 10, 1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        logger=logger or False,
        log_every_n_steps=max(min(10, steps), 1),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[log],
        max_time={"minutes": max_minutes} if max_minutes else None,
    )
    L.seed_everything(seed, verbose=False)  # the same batches, timesteps, noise and dropout for every member
    started = time.perf_counter()
    trainer.fit(system, datamodule=data)
    seconds = time.perf_counter() - started
    return {"steps": trainer.global_step, "seconds": round(seconds, 1), "loss_curve": log.curve}, trainer


def member_settings(member: str, stand_in: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    """``member``'s tiny model settings at stage 3, its UNet from the stand-in, the shared evaluation."""
    settings = model_settings(member_config(member))
    settings.update(member=member, stage=3, init_from=None, evaluation=evaluation)
    settings["generation"] = {**(settings.get("generation") or {}), "pretrained": str(stand_in)}
    return settings


# --------------------------------------------------------------------------------------- evaluation
def held_out(data: AdvancedEditDataModule, count: int, batch_size: int, reasoning: float) -> list[dict[str, Any]]:
    """The same ``count`` held-out samples on every call, phrased templated (0) or reasoning (1)."""
    random.seed(1234)  # the phrasing within a pool is drawn from ``random``
    dataset = data.datasets["val"]
    config = dataset.builder.config
    dataset.builder.config = dataclasses.replace(config, reasoning_probability=reasoning)
    try:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()[:count]
        samples = [dataset[i] for i in order]
    finally:
        dataset.builder.config = config
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch: dict[str, Any] = {key: torch.stack([s[key] for s in chunk]) for key in ("source", "target", "mask")}
        batch["mllm_source"] = torch.stack([s["mllm_source"] for s in chunk])
        for key in ("instruction", "task_type", "record_id", "target_caption"):
            batch[key] = [s[key] for s in chunk]
        batches.append(batch)
    return batches


def psnr_in_mask(edited: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per-image PSNR (dB, data range 1) of ``edited`` to ``target`` (B, 3, H, W) in [-1, 1] inside ``mask``."""
    weights = (mask > 0.5).float().expand_as(edited)
    error = (((edited - target) / 2) ** 2 * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp(min=1)
    return [PSNR_CAP_DB if e <= 0 else min(PSNR_CAP_DB, -10 * math.log10(e)) for e in error.tolist()]


@torch.no_grad()
def edit_all(system: EditorSystem | None, batches: list[dict[str, Any]], test: TestSettings) -> list[torch.Tensor]:
    """Each batch edited by ``system`` with the test settings' sampler (``None``: the identity edit)."""
    if system is None:
        return [batch["source"] for batch in batches]
    system.eval()
    outputs = []
    for index, batch in enumerate(batches):
        generator = torch.Generator().manual_seed(test.seed + index)
        outputs.append(
            system.edit(
                batch["source"],
                batch["mllm_source"],
                batch["instruction"],
                image_scale=test.image_scale,
                num_inference_steps=test.num_inference_steps,
                text_guidance=test.text_guidance,
                image_guidance=test.image_guidance,
                generator=generator,
            )
        )
    return outputs


def score(
    runs: dict[str, EditTestRun],
    row: str,
    batches: dict[str, list[dict[str, Any]]],
    edits: dict[str, list[torch.Tensor]],
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Score one row's edits of each phrasing; ``{phrasing: {group: {metric: mean}}}`` (group: all, task)."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for phrasing, phrased in batches.items():
        inside: dict[str, list[float]] = defaultdict(list)
        for batch, edited in zip(phrased, edits[phrasing], strict=True):
            runs[phrasing].add(row, batch, edited)
            for task, value in zip(
                batch["task_type"], psnr_in_mask(edited, batch["target"], batch["mask"]), strict=True
            ):
                inside["all"].append(value)
                inside[task].append(value)
        groups = aggregate_groups(runs[phrasing].rows[row])
        table[phrasing] = {}
        for group, values in inside.items():
            summary = groups["all" if group == "all" else f"subset:{group}"]
            table[phrasing][group] = {
                "n": len(values),
                "psnr_in_mask": sum(values) / len(values),
                **{key: summary.get(key) for key in ("psnr", "ssim", "lpips", "psnr_target", "ssim_target")},  # type: ignore[misc]
            }
    return table


# ------------------------------------------------------------------------------------------ outputs
def cell(value: float | None, digits: int = 2) -> str:
    """A table cell: ∞ at the PSNR cap, n/a when not computed."""
    if value is None:
        return "n/a"
    return "∞" if value >= PSNR_CAP_DB else f"{value:.{digits}f}"


def markdown(scores: dict[str, dict[str, Any]], lpips_label: str) -> str:
    """The paper-shaped table (rows: members) per phrasing, then in-mask / outside PSNR per task type."""
    lines = [
        f"Outside the mask, source vs edit (preservation; LPIPS = {lpips_label}); PSNR-tgt: edit vs target, "
        "whole image; in-mask: edit vs target inside the mask (did the edit happen).",
        "",
    ]
    head = "| row |" + "".join(f" {p} PSNR ↑ | SSIM ↑ | LPIPS ↓ | PSNR-tgt ↑ | in-mask ↑ |" for p in PHRASINGS)
    lines += [head, "|---|" + "---|" * 5 * len(PHRASINGS)]
    for row, table in scores.items():
        cells = []
        for phrasing in PHRASINGS:
            s = table[phrasing]["all"]
            cells += [
                cell(s["psnr"]),
                cell(s["ssim"], 3),
                cell(s["lpips"], 3),
                cell(s["psnr_target"]),
                cell(s["psnr_in_mask"]),
            ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "In-mask PSNR to the target / PSNR outside the mask (source vs edit), per task type:", ""]
    head = "| row |" + "".join(f" {t} ({p[:5]}.) |" for p in PHRASINGS for t in TASKS)
    lines += [head, "|---|" + "---|" * len(TASKS) * len(PHRASINGS)]
    for row, table in scores.items():
        cells = []
        for phrasing in PHRASINGS:
            for task in TASKS:
                s = table[phrasing].get(task)
                cells.append(f"{cell(s['psnr_in_mask'], 1)} / {cell(s['psnr'], 1)}" if s else "–")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tile(image: torch.Tensor, side: int) -> Image.Image:
    """(3, H, W) in [-1, 1] → a ``side``-pixel square (nearest, so pixels stay visible)."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels).resize((side, side), Image.Resampling.NEAREST)


def picture(
    batches: list[dict[str, Any]], edits: dict[str, list[torch.Tensor]], path: Path, per_task: int, scale: int
) -> None:
    """A PNG grid: a row per held-out example (``per_task`` of each task type), columns source | rows | target."""
    picked: list[tuple[int, int]] = []
    counts: dict[str, int] = defaultdict(int)
    for b, batch in enumerate(batches):
        for i, task in enumerate(batch["task_type"]):
            if counts[task] < per_task:
                counts[task] += 1
                picked.append((b, i))
    picked.sort(key=lambda bi: TASKS.index(batches[bi[0]]["task_type"][bi[1]]))
    columns = ["source", *edits, "target"]
    side, pad, head, text = batches[0]["source"].shape[-1] * scale, 4, 28, 220
    font = ImageFont.load_default()
    width = text + len(columns) * (side + pad) + pad
    canvas = Image.new("RGB", (width, head + len(picked) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        x = text + pad + c * (side + pad)
        words = name.replace(" (", "\n(").split("\n")
        for k, line in enumerate(words[:2]):
            draw.text((x, 2 + 12 * k), line, fill="black", font=font)
    for r, (b, i) in enumerate(picked):
        batch = batches[b]
        y = head + r * (side + pad)
        images = [batch["source"][i], *(edits[name][b][i] for name in edits), batch["target"][i]]
        for c, image in enumerate(images):
            canvas.paste(tile(image, side), (text + pad + c * (side + pad), y))
        caption, lines = f"[{batch['task_type'][i]}] {batch['instruction'][i]}", [""]
        for word in caption.split():  # wrap into the text column
            if draw.textlength(lines[-1] + " " + word, font=font) > text - 2 * pad:
                lines.append(word)
            else:
                lines[-1] = (lines[-1] + " " + word).strip()
        for k, line in enumerate(lines[: side // 12]):
            draw.text((pad, y + 12 * k), line, fill="black", font=font)
    canvas.save(path, optimize=True)


def machine() -> dict[str, Any]:
    """Where the run happened: cores, torch threads, load when it started, platform."""
    return {
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------- W&B
def wandb_logger(args: argparse.Namespace, group: str, name: str, config: dict[str, Any]) -> Any:
    """An offline W&B logger of the shared project and group (``None`` with ``--no-wandb``)."""
    if args.no_wandb:
        return None
    from lightning.pytorch.loggers import WandbLogger

    args.wandb_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=args.wandb_project,
        group=group,
        name=name,
        job_type="train",
        save_dir=str(args.wandb_dir),
        offline=True,
        config=config,
    )


METRIC_COLUMNS = ("n", "psnr", "ssim", "lpips", "psnr_target", "ssim_target", "psnr_in_mask")


def metrics_table(scores: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Rows of (row, phrasing, group, metrics...) for a ``wandb.Table``."""
    columns = ["row", "phrasing", "group", *METRIC_COLUMNS]
    data = [
        [row, phrasing, group, *(summary.get(key) for key in METRIC_COLUMNS)]
        for row, table in scores.items()
        for phrasing, groups in table.items()
        for group, summary in groups.items()
    ]
    return columns, data


def log_test(logger: Any, row: str, table: dict[str, Any]) -> None:
    """Log a member's test metrics to its run (scalars and a table), then close the run."""
    if logger is None:
        return
    import wandb

    scalars = {
        f"test/{phrasing}/{group}/{key}": value
        for phrasing, groups in table.items()
        for group, summary in groups.items()
        for key, value in summary.items()
        if value is not None
    }
    columns, data = metrics_table({row: table})
    logger.experiment.log({**scalars, "test/metrics": wandb.Table(columns=columns, data=data)})
    logger.experiment.summary.update(scalars)
    logger.experiment.finish()


def log_comparison(args: argparse.Namespace, group: str, results: dict[str, Any], grid: Path) -> str | None:
    """One more run in the group holding every row's metrics and the picture grid; its folder."""
    if args.no_wandb:
        return None
    import wandb

    run = wandb.init(
        project=args.wandb_project,
        group=group,
        name="comparison",
        job_type="compare",
        dir=str(args.wandb_dir),
        mode="offline",
        config={k: v for k, v in results.items() if k not in ("scores", "runs")},
    )
    columns, data = metrics_table(results["scores"])
    run.log({"test/metrics": wandb.Table(columns=columns, data=data), "test/edits": wandb.Image(str(grid))})
    folder = str(Path(run.dir).parent)
    run.finish()
    return folder


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps of every member (stage 3)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="stand-in steps (default: --steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: tiny/stage3.yaml's (16)")
    parser.add_argument("--members", nargs="+", default=list(MEMBERS), choices=list(MEMBERS))
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="cap on each training run; a member stopped early is flagged"
    )
    parser.add_argument("--eval-pairs", type=int, default=48, help="held-out pairs, scored with each phrasing")
    parser.add_argument("--inference-steps", type=int, default=None, help="default: the yaml's evaluation setting")
    parser.add_argument("--text-guidance", type=float, default=None, help="default: the evaluation setting (7.5)")
    parser.add_argument("--image-guidance", type=float, default=None, help="default: the evaluation setting (1.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--wandb-project", default="insightedit-zoo")
    parser.add_argument("--wandb-dir", type=Path, default=Path("checkpoints/zoo"), help="offline W&B runs go here")
    parser.add_argument("--no-wandb", action="store_true", help="log nothing to W&B")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the stand-in and every member, score them, write the results; return them."""
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    members, notes = available_members(args.members)
    shared = yaml.safe_load(SHARED.read_text())
    data_args = dict(shared["data"]["init_args"])
    if args.batch_size:
        data_args["batch_size"] = args.batch_size
    evaluation = dict(shared["model"]["init_args"].get("evaluation") or {})
    for option, key in (
        ("inference_steps", "num_inference_steps"),
        ("text_guidance", "text_guidance"),
        ("image_guidance", "image_guidance"),
    ):
        if getattr(args, option) is not None:
            evaluation[key] = getattr(args, option)
    evaluation["save_edits"] = False
    test = TestSettings(**evaluation)
    pretrain_steps = args.pretrain_steps if args.pretrain_steps is not None else args.steps
    group = f"zoo-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    results: dict[str, Any] = {
        **provenance(),
        "machine": machine(),
        "steps": args.steps,
        "pretrain_steps": pretrain_steps,
        "batch_size": data_args["batch_size"],
        "seed": args.seed,
        "data": data_args,
        "evaluation": dataclasses.asdict(test),
        "members": members,
        "notes": notes,
        "wandb": {"project": args.wandb_project, "group": group, "dir": str(args.wandb_dir)},
        "runs": {},
        "eval_seconds": {},
        "scores": {},
    }
    for member, note in notes.items():
        print(f"{member}: {note}", flush=True)

    # the same data for every member: the stand-in reads templated instructions only, as its yaml says
    stand_in_data = AdvancedEditDataModule(**{**data_args, "reasoning_probability": 0.0})
    stand_in_data.prepare_data()
    stand_in_data.setup("fit")
    data = AdvancedEditDataModule(**data_args)
    data.setup("fit")
    batches = {p: held_out(data, args.eval_pairs, 16, reasoning) for p, reasoning in PHRASINGS.items()}
    results["eval_pairs"] = sum(len(b["task_type"]) for b in batches["templated"])
    runs = {phrasing: EditTestRun(test) for phrasing in PHRASINGS}
    lpips_label = runs["templated"].scorers.lpips.label if runs["templated"].scorers.lpips else "not computed"
    results["protocol"] = runs["templated"].protocol.describe()
    edits: dict[str, dict[str, list[torch.Tensor]]] = {}

    def record(row: str, system: EditorSystem | None) -> dict[str, Any]:
        t = time.perf_counter()
        edits[row] = {p: edit_all(system, phrased, test) for p, phrased in batches.items()}
        editing = time.perf_counter() - t
        results["scores"][row] = score(runs, row, batches, edits[row])
        scoring = time.perf_counter() - t - editing
        results["eval_seconds"][row] = {"edit": round(editing, 1), "score": round(scoring, 1)}
        all_ = results["scores"][row]["templated"]["all"]
        print(
            f"[{row}] edited in {editing:.0f}s, scored in {scoring:.0f}s: templated in-mask "
            f"{cell(all_['psnr_in_mask'])} dB, outside {cell(all_['psnr'])} dB",
            flush=True,
        )
        return results["scores"][row]  # type: ignore[no-any-return]

    record(IDENTITY, None)
    with tempfile.TemporaryDirectory(prefix="zoo-") as work:
        stand_in_settings = model_settings(STAND_IN)
        stand_in_settings.update(evaluation=evaluation)
        stand_in = build_system(stand_in_settings, args.seed)
        logger = wandb_logger(args, group, "stand-in (tiny InstructPix2Pix)", {"member": "instruct_pix2pix"})
        print(f"[stand-in] training {pretrain_steps} steps (templated instructions)", flush=True)
        results["runs"]["stand-in"], trainer = fit(
            stand_in, stand_in_data, pretrain_steps, args.seed, "stand-in", logger, args.max_minutes
        )
        checkpoint = Path(work) / "stand_in.ckpt"
        trainer.save_checkpoint(checkpoint)
        if logger is not None:
            logger.experiment.finish()
        del stand_in
        for member in members:
            row = ROWS.get(member, member)
            settings = member_settings(member, checkpoint, evaluation)
            system = build_system(settings, args.seed)
            run_config = {"member": member, "row": row, "steps": args.steps, "seed": args.seed, "model": settings}
            logger = wandb_logger(args, group, row, {**run_config, "batch_size": data_args["batch_size"]})
            print(f"[{row}] training {args.steps} steps from the stand-in", flush=True)
            results["runs"][row] = {"member": member, "config": str(member_config(member))}
            stats, _ = fit(system, data, args.steps, args.seed, row, logger, args.max_minutes)
            results["runs"][row].update(stats)
            t = time.perf_counter()
            table = record(row, system)
            results["runs"][row]["eval_seconds"] = round(time.perf_counter() - t, 1)
            log_test(logger, row, table)
            del system
    steps = {row: run["steps"] for row, run in results["runs"].items() if row != "stand-in"}
    results["equal_steps"] = len(set(steps.values())) <= 1
    if not results["equal_steps"]:
        print(f"WARNING: members trained unequal steps (--max-minutes): {steps}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    grid = args.out / "zoo_edits.png"
    picture(batches["templated"], {row: e["templated"] for row, e in edits.items() if row != IDENTITY}, grid, 2, 3)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["wandb"]["comparison_run"] = log_comparison(args, group, results, grid)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    table = markdown(results["scores"], lpips_label)
    header = [
        f"# The zoo on equal terms ({results['date']})",
        "",
        f"`{results['command']}` at `{results['commit']}`; {results['machine']['affinity_cores']} cores "
        f"(load {results['machine']['load_average_at_start'][0]:.1f} at start), wall time "
        f"{results['wall_seconds'] / 60:.1f} min. Stand-in: {results['runs']['stand-in']['steps']} steps; "
        f"every member: stage 3, {args.steps} steps from it, batch {data_args['batch_size']}, seed {args.seed}. "
        f"{results['eval_pairs']} held-out pairs, protocol {test.protocol} at {test.resolution} px, "
        f"{test.num_inference_steps} DDIM steps, guidance text {test.text_guidance} / image {test.image_guidance}.",
        "",
        "Minutes of CPU training on the 32-px synthetic twin: the table shows which members begin to edit, not "
        "which is best, and is never comparable with the paper's numbers "
        "(docs/deviations.md#6-the-comparison-on-the-twin).",
        "",
        "| run | steps | train s | edit + score s |",
        "|---|---|---|---|",
        *(
            f"| {row} | {run['steps']} | {run['seconds']} | {run.get('eval_seconds', '–')} |"
            for row, run in results["runs"].items()
        ),
        "",
        *([] if results["equal_steps"] else ["**The members trained unequal steps (stopped by --max-minutes).**", ""]),
        *(f"- {member}: {note}" for member, note in notes.items()),
        "",
    ]
    (args.out / "zoo_results.md").write_text("\n".join(header) + table + "\n")
    (args.out / "zoo_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    print(f"wrote {args.out / 'zoo_results.md'}, zoo_results.json and {grid} in {results['wall_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
