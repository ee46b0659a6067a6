"""The zoo compared on equal terms, on the tiny foundations, over two data seeds; one command.

Every member of :data:`insightedit.models.zoo.MEMBERS` starts where its tiny yaml
(``lightning_configs/tiny/<member>.yaml``, InsightEdit's is ``tiny/stage3.yaml``) starts: from the tiny
foundations ``insightedit foundations`` builds (CLIP: text encoder, IAA target, MLLM vision tower; the
tiny LLaVA; the InstructPix2Pix UNet), as the full members start from CLIP, LLaVA-1.5 and
``timbrooks/instruct-pix2pix``. The run:

1. **foundations**: ensures them under ``--foundations`` (default ``$INSIGHTEDIT_FOUNDATIONS``, else
   ``checkpoints/tiny/foundations``; the tiny yamls read the same root) with ``insightedit foundations``,
   which returns at once when they are built and current, and records each one's stamp (what it was
   built from, its held-out metric, its build minutes). ``--no-build`` uses them as they are;
2. for each **data seed** (``--seeds``, default 0 and 1; the synthetic world's seed, the split's seed
   and the training seed: other images, other held-out pairs, other batches and noise), every member
   trains in the paper's order: its align stage (stage 1: MLLM LoRA, [MM] rows and bridge or head with
   ``L_LLM + L_align``, no UNet; ``--align-steps``, 1,500 by default, at its tiny learning rates) where it
   has one, then its stage 3 with its yaml's model settings (the InstructPix2Pix row, whose stages all
   train the UNet, continues the foundation UNet, which its yaml builds), on the same data
   (``tiny/stage3.yaml``'s: templated and reasoning phrasings), the same steps, batch, seed and draws;
   then every member, and the identity edit
   (output = source), edits the same held-out pairs (sources never seen in training) with the templated
   phrasing and with the reasoning one, scored by the ``advancededit`` protocol of
   :mod:`insightedit.evaluation` (the yaml's ``evaluation:``: PSNR / SSIM / LPIPS outside the edit mask,
   source vs edit; PSNR to the target) plus the PSNR to the target *inside* the mask (did the edit
   happen; at the data's 32 px, per image, then averaged), per task type;
3. the per-seed scores become per-row means and seed-to-seed spreads, read against the issue's
   orderings (with IAA > without; reasoning: InsightEdit > SmartEdit > InstructPix2Pix) and its target
   (≥ 3 dB over the identity edit in the mask on each task, background ≥ 30 dB): :mod:`zoo_stats`.

Writes under ``--out``: ``zoo_results.json`` (command, commit, date, machine, the foundations' stamps,
per-phase and total wall time, every run's steps, seconds and loss curve, every score per seed, the
summary, the orderings, the target), ``zoo_results.md`` (the tables) and ``zoo_edits.png`` (seed
``--seeds[0]``: a row per held-out example, source | each member's edit | target). Every training run
and a comparison run go to one offline W&B project under a shared group (``--wandb-dir``).

Time budget (the issue: the whole comparison ≤ 90 min on 2 cores, foundations included when not yet
built). The defaults: every member trains tiny/stage3.yaml's 300 steps at batch 16 (the members' own
recipe, unchanged), 192 held-out pairs per seed (64 per task), both seeds side by side (``--jobs 2``:
two processes of one torch thread, which on 2 cores train faster together than one process of two threads: 2 × 1.38 vs
1.84 steps/s idle, README's main job; a one-thread step does not slow beside one other busy process,
0.92×, benchmarks/results/shared_cpu.md). The arithmetic, conservative (every member at InsightEdit's step
rate; InstructPix2Pix's step costs half, benchmarks/results/step_cost.json):

* foundations: 16.8 min cold on 2 idle cores (clip 9.8 with two threads, then mllm 7.0 beside
  instruct_pix2pix 6.7, benchmarks/results/foundations_build.md); 0 when cached (the builder checks the
  stamps and returns);
* data: the synthetic world of each seed, ≤ 1 min on first use (57 s for seed 1 at load 4), cached;
* training, per seed (the seeds in parallel): 6 members × 300 steps / 1.38 steps/s = 21.7 min, plus the
  align stages: 5 members × 1,500 steps × ~0.08 s = ~10 min;
* evaluation, per seed: 6 members × 2 phrasings × 192 pairs = 2,304 edits (20 DDIM steps, batches of
  16) at 0.16-0.36 s each on one thread (the 48-pair run at 3b32cbf: 15-35 s per member for its 96
  edits, benchmarks/results/zoo_results_48pairs.json) ≈ 10.5 min, plus ~3 min scoring;
* total ≈ 16.8 + 1 + 31.7 + 13.5 ≈ 63 min cold, ≈ 46 min with the foundations cached: inside the 90
  min with ~27 min to spare for a busier machine (the members' steps are cheaper than InsightEdit's, so
  idle runs take less: see the README for the measured time). Smoke runs on the shared machine (load
  4-10): ``--steps 2 --eval-pairs 8`` took 6.4 min one seed after the other and 7.5 min side by side.

Memory: ~0.9 GiB for the main process and ~1.4 GiB per seed worker (peak RSS of a smoke run), ~3.7 GiB
in all with two jobs; ``--jobs 1`` keeps it to one model at a time.

    python benchmarks/zoo.py --steps 2 --eval-pairs 8 --no-wandb --out /tmp/zoo-smoke   # a smoke run
    python benchmarks/zoo.py --out benchmarks/results                                   # the comparison
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
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont

from insightedit.allocator import pad_heap
from insightedit.commands.foundations import FOUNDATIONS, FOUNDATIONS_ENV, STAMP, FoundationBuilder, default_root
from insightedit.data import AdvancedEditDataModule
from insightedit.errors import UserError
from insightedit.evaluation.metrics import PSNR_CAP_DB
from insightedit.evaluation.model_test import EditTestRun, TestSettings
from insightedit.evaluation.report import aggregate_groups
from insightedit.models.zoo import MEMBERS, get_member
from insightedit.systems.editor_system import EditorSystem

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_stats  # noqa: E402
from provenance import provenance  # noqa: E402
from zoo_stats import IDENTITY, TASKS, cell  # noqa: E402

PHRASINGS = {"templated": 0.0, "reasoning": 1.0}  # held-out phrasing -> reasoning probability
ROWS = {  # the paper's row names, in the paper's order
    "instruct_pix2pix": "InstructPix2Pix",
    "mgie": "MGIE",
    "smartedit": "SmartEdit",
    "insightedit_no_iaa": "InsightEdit w/o IAA",
    "insightedit_no_bim": "InsightEdit w/o BIM",
    "insightedit": "InsightEdit",
}
CONFIGS = Path("lightning_configs/tiny")
SHARED = CONFIGS / "stage3.yaml"  # data, steps and evaluation settings every member shares
UNET_FOUNDATION = "instruct_pix2pix/last.ckpt"  # under the foundations root
DEFAULT_SEEDS = (0, 1)
DEFAULT_STEPS = 300  # tiny/stage3.yaml's max_steps (see the time budget in the docstring)
# stage 1 of the members that align (~0.08 s a step): 300 steps (tiny/stage1.yaml's) left InsightEdit's add and
# replace at the identity edit; 1,500 raised them to +2.1 / +3.2 dB (seed 0, 2026-12-03 22:52, docs/zoo.md)
DEFAULT_ALIGN_STEPS = 1500
DEFAULT_EVAL_PAIRS = 192  # 64 per task: one seed's evaluation noise is ~0.3 dB in all, not ~0.6 (see the README)
DEFAULT_JOBS = 2  # the two seeds side by side, one torch thread each (see the time budget)


# ------------------------------------------------------------------------------------------ configs
def member_config(member: str) -> Path:
    """The tiny yaml whose model settings ``member`` trains with."""
    return SHARED if member == "insightedit" else CONFIGS / f"{member}.yaml"


def read_config(path: Path) -> dict[str, Any]:
    """A LightningCLI yaml, interpolations resolved (the foundations root: ``$INSIGHTEDIT_FOUNDATIONS``)."""
    return OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=True)  # type: ignore[return-value]


def model_settings(path: Path) -> dict[str, Any]:
    """The ``model.init_args`` of a LightningCLI yaml, interpolations resolved."""
    return dict(read_config(path)["model"]["init_args"])


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


def member_settings(member: str, root: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    """``member``'s tiny model settings at stage 3, the shared evaluation; its UNet from the foundation.

    The members' yamls name the foundation UNet (``generation.pretrained``) themselves; InstructPix2Pix's
    yaml is the recipe that builds it, so its row continues it.
    """
    settings = model_settings(member_config(member))
    settings.update(member=member, stage=3, init_from=None, evaluation=evaluation)
    generation = dict(settings.get("generation") or {})
    generation.setdefault("pretrained", str(root / UNET_FOUNDATION))
    settings["generation"] = generation
    return settings


def starting_points(settings: dict[str, Any]) -> dict[str, str]:
    """The pretrained weights ``settings`` name (``section.key``: path), for the results."""
    found = {}
    for section, key in (("comprehension", "pretrained"), ("bridging", "clip_pretrained"),
                         ("generation", "pretrained"), ("generation", "text_encoder")):  # fmt: skip
        value = (settings.get(section) or {}).get(key)
        if value:
            found[f"{section}.{key}"] = str(value)
    return found


# -------------------------------------------------------------------------------------- foundations
def ensure_foundations(root: Path, build: bool, jobs: int = 1) -> dict[str, Any]:
    """Build (or find current) the foundations in ``root``; each one's stamp, and whether this run built it.

    With ``build`` it runs ``insightedit foundations``' builder (a current foundation is skipped at once; up
    to ``jobs`` side by side);
    without, it only checks each foundation's output is there (a missing one: a :class:`UserError`).
    """
    built: dict[str, bool] = {}
    if build:
        for outcome in FoundationBuilder(root, jobs=jobs).build():
            built[outcome.name] = outcome.built
    records = {}
    for foundation in FOUNDATIONS:
        folder = root / foundation.name
        if not (folder / foundation.done).is_file():
            raise UserError(
                f"foundation {foundation.name}: {folder / foundation.done} not found; build the foundations with "
                f"`insightedit foundations --out {root}` (or drop --no-build)"
            )
        try:
            stamp = json.loads((folder / STAMP).read_text())
        except (OSError, ValueError):
            stamp = {}
        records[foundation.name] = {
            "folder": str(folder),
            "built_by_this_run": built.get(foundation.name, False),
            "checked_current": build,
            "inputs": stamp.get("inputs"),
            "metric": stamp.get("metric"),
            "build_minutes": stamp.get("minutes"),
            "date": stamp.get("date"),
        }
    return records


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


# --------------------------------------------------------------------------------------- evaluation
def balanced_pick(tasks: list[str], count: int) -> list[int]:
    """Positions of ``count`` items taken from ``tasks`` (each item's task, in a drawn order) a task at a time.

    Round robin over the tasks in :data:`TASKS` order, each task's items in their order, so every task
    gets an equal share (± 1) while it has items left; a task that runs out leaves its turns to the others.
    """
    queues = {
        task: [i for i, t in enumerate(tasks) if t == task] for task in (*TASKS, *sorted(set(tasks) - set(TASKS)))
    }
    picked: list[int] = []
    while len(picked) < count and any(queues.values()):
        for queue in queues.values():
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def held_out(data: AdvancedEditDataModule, count: int, batch_size: int, reasoning: float) -> list[dict[str, Any]]:
    """The same ``count`` held-out samples on every call, an equal share of each task (:func:`balanced_pick`) from
    a seeded order of the split, phrased templated (0) or reasoning (1)."""
    random.seed(1234)  # the phrasing within a pool is drawn from ``random``
    dataset = data.datasets["val"]
    config = dataset.builder.config
    dataset.builder.config = dataclasses.replace(config, reasoning_probability=reasoning)
    try:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
        picked = balanced_pick([dataset.records[i].task_type for i in order], count)
        samples = [dataset[order[position]] for position in picked]
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


def metrics_table(scores: dict[str, dict[str, Any]], seed: int) -> tuple[list[str], list[list[Any]]]:
    """Rows of (seed, row, phrasing, group, metrics...) for a ``wandb.Table``."""
    columns = ["seed", "row", "phrasing", "group", *METRIC_COLUMNS]
    data = [
        [seed, row, phrasing, group, *(summary.get(key) for key in METRIC_COLUMNS)]
        for row, table in scores.items()
        for phrasing, groups in table.items()
        for group, summary in groups.items()
    ]
    return columns, data


def log_test(logger: Any, row: str, seed: int, table: dict[str, Any]) -> None:
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
    columns, data = metrics_table({row: table}, seed)
    logger.experiment.log({**scalars, "test/metrics": wandb.Table(columns=columns, data=data)})
    logger.experiment.summary.update(scalars)
    logger.experiment.finish()


def log_comparison(args: argparse.Namespace, group: str, results: dict[str, Any], grid: Path) -> str | None:
    """One more run in the group: every seed's metrics, the orderings, the target and the picture; its folder."""
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
        config={k: v for k, v in results.items() if k not in ("per_seed", "summary", "orderings")},
    )
    columns, data = ["seed", "row", "phrasing", "group", *METRIC_COLUMNS], []
    for seed, per_seed in results["per_seed"].items():
        data += metrics_table(per_seed["scores"], int(seed))[1]
    orderings = [[o["claim"], o["ordering"], o["holds_beyond_spread"], o["text"]] for o in results["orderings"]]
    run.log(
        {
            "test/metrics": wandb.Table(columns=columns, data=data),
            "test/orderings": wandb.Table(
                columns=["claim", "ordering", "holds_beyond_spread", "pairs"], data=orderings
            ),
            "test/edits": wandb.Image(str(grid)),
        }
    )
    run.summary.update({"target_met": results["target"]["met"], "wall_minutes": results["wall_seconds"] / 60})
    folder = str(Path(run.dir).parent)
    run.finish()
    return folder


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--foundations", type=Path, default=None,
        help=f"the foundations root (default ${FOUNDATIONS_ENV}, else checkpoints/tiny/foundations); the tiny "
        "yamls are read with it",
    )  # fmt: skip
    parser.add_argument(
        "--no-build", action="store_true", help="use the foundations as they are (do not run insightedit foundations)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="data seeds")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="stage-3 training steps of every member, every seed"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: tiny/stage3.yaml's (16)")
    parser.add_argument(
        "--align-steps", type=int, default=DEFAULT_ALIGN_STEPS,
        help="steps of each member's align stage (stage 1: no UNet, L_align) before stage 3, as the paper "
        "orders them; 0: stage 3 alone, from the foundations",
    )  # fmt: skip
    parser.add_argument("--members", nargs="+", default=list(MEMBERS), choices=list(MEMBERS))
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="cap on each training run; a member stopped early is flagged"
    )
    parser.add_argument(
        "--eval-pairs", type=int, default=DEFAULT_EVAL_PAIRS, help="held-out pairs per seed, scored with each phrasing"
    )
    parser.add_argument("--inference-steps", type=int, default=None, help="default: the yaml's evaluation setting")
    parser.add_argument("--text-guidance", type=float, default=None, help="default: the evaluation setting (7.5)")
    parser.add_argument("--image-guidance", type=float, default=None, help="default: the evaluation setting (1.5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--wandb-project", default="insightedit-zoo")
    parser.add_argument("--wandb-dir", type=Path, default=Path("checkpoints/zoo"), help="offline W&B runs go here")
    parser.add_argument("--no-wandb", action="store_true", help="log nothing to W&B")
    parser.add_argument(
        "--jobs", type=int, default=DEFAULT_JOBS,
        help="seeds run at once, each in its own process with cores // jobs torch threads (1: one after another)",
    )  # fmt: skip
    parser.add_argument("--wandb-group", default=None, help=argparse.SUPPRESS)  # set by the parent for its workers
    parser.add_argument("--worker-seed", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    for option in ("steps", "eval_pairs", "jobs"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be ≥ 1")
    if args.align_steps < 0:
        parser.error("--align-steps must be ≥ 0 (0: no align stage)")
    return args


def seed_data_args(shared: dict[str, Any], seed: int, batch_size: int | None) -> dict[str, Any]:
    """The shared data settings with ``seed`` as the synthetic world's, the split's and the sampler's seed."""
    data_args = copy.deepcopy(dict(shared["data"]["init_args"]))
    data_args["synthetic"] = {**(data_args.get("synthetic") or {}), "seed": seed}
    data_args["seed"] = seed
    if batch_size:
        data_args["batch_size"] = batch_size
    return data_args


def test_settings(shared: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], TestSettings]:
    """The shared evaluation settings with the command line's overrides."""
    evaluation = dict(shared["model"]["init_args"].get("evaluation") or {})
    for option, key in (
        ("inference_steps", "num_inference_steps"),
        ("text_guidance", "text_guidance"),
        ("image_guidance", "image_guidance"),
    ):
        if getattr(args, option) is not None:
            evaluation[key] = getattr(args, option)
    evaluation["save_edits"] = False
    return evaluation, TestSettings(**evaluation)


def align(
    settings: dict[str, Any], data: AdvancedEditDataModule, args: argparse.Namespace, seed: int, row: str, to: Path
) -> tuple[dict[str, Any], Path] | None:
    """The member's stage 1 when it is an alignment stage (no UNet, ``L_align``), as the paper's order has it.

    Trains ``--align-steps`` steps from the foundations at the member's tiny learning rates (its yaml's
    ``stage_settings.learning_rates``; the stage's groups and losses are the member's own) and saves the
    checkpoint stage 3 starts from (``init_from``). ``None`` for a member without one (InstructPix2Pix's
    stages all train its UNet).
    """
    rates = (settings.get("stage_settings") or {}).get("learning_rates") or {}
    stage1 = {**settings, "stage": 1, "stage_settings": {"learning_rates": rates} if rates else None}
    system = build_system(stage1, seed)
    if system.stage.use_unet or not system.stage.weight("align"):
        return None
    print(f"[seed {seed}] [{row}] align stage: {args.align_steps} steps from the foundations", flush=True)
    stats, trainer = fit(system, data, args.align_steps, seed, f"{row} seed {seed} align", None, args.max_minutes)
    trainer.save_checkpoint(to)
    return stats, to


def run_seed(args: argparse.Namespace, seed: int, members: list[str], root: Path, group: str) -> dict[str, Any]:
    """Train and score every member on data seed ``seed``; the seed's record (``edits``: templated, for the picture)."""
    t_seed = time.perf_counter()
    shared = read_config(SHARED)
    evaluation, test = test_settings(shared, args)
    data_args = seed_data_args(shared, seed, args.batch_size)
    data = AdvancedEditDataModule(**data_args)
    data.prepare_data()  # the synthetic world of this seed, generated under data/ on first use
    data.setup("fit")
    batches = {p: held_out(data, args.eval_pairs, 16, reasoning) for p, reasoning in PHRASINGS.items()}
    runs = {phrasing: EditTestRun(test) for phrasing in PHRASINGS}
    lpips = runs["templated"].scorers.lpips
    record: dict[str, Any] = {
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "data": data_args,
        "data_seconds": round(time.perf_counter() - t_seed, 1),
        "eval_pairs": sum(len(b["task_type"]) for b in batches["templated"]),
        "protocol": runs["templated"].protocol.describe(),
        "lpips_label": lpips.label if lpips else "not computed",
        "starting_points": {},
        "runs": {},
        "scores": {},
    }
    edits: dict[str, list[torch.Tensor]] = {}

    def evaluate(row: str, system: EditorSystem | None) -> dict[str, Any]:
        t = time.perf_counter()
        edited = {p: edit_all(system, phrased, test) for p, phrased in batches.items()}
        editing = time.perf_counter() - t
        record["scores"][row] = score(runs, row, batches, edited)
        scoring = time.perf_counter() - t - editing
        record["runs"].setdefault(row, {}).update(edit_seconds=round(editing, 1), score_seconds=round(scoring, 1))
        if system is not None:
            edits[row] = edited["templated"]
        all_ = record["scores"][row]["templated"]["all"]
        print(
            f"[seed {seed}] [{row}] edited in {editing:.0f}s, scored in {scoring:.0f}s: templated in-mask "
            f"{cell(all_['psnr_in_mask'])} dB, outside {cell(all_['psnr'])} dB",
            flush=True,
        )
        return record["scores"][row]  # type: ignore[no-any-return]

    evaluate(IDENTITY, None)
    with tempfile.TemporaryDirectory(prefix=f"insightedit-zoo-seed{seed}-") as work:  # align checkpoints
        for member in members:
            row = ROWS.get(member, member)
            settings = member_settings(member, root, evaluation)
            record["starting_points"][row] = starting_points(settings)
            record["runs"][row] = {"member": member, "config": str(member_config(member))}
            if args.align_steps > 0:
                aligned = align(settings, data, args, seed, row, Path(work) / f"{member}-seed{seed}-align.ckpt")
                if aligned is not None:
                    record["runs"][row]["align"], checkpoint = aligned
                    settings = {**settings, "init_from": str(checkpoint)}
            system = build_system(settings, seed)
            run_config = {"member": member, "row": row, "steps": args.steps, "seed": seed, "model": settings}
            logger = wandb_logger(args, group, f"{row} seed {seed}", {**run_config, "data": data_args})
            start = "its align stage" if settings.get("init_from") else "the foundations"
            print(f"[seed {seed}] [{row}] training {args.steps} steps from {start}", flush=True)
            stats, _ = fit(system, data, args.steps, seed, f"{row} seed {seed}", logger, args.max_minutes)
            record["runs"][row].update(stats)
            log_test(logger, row, seed, evaluate(row, system))
            del system
    record["seconds"] = round(time.perf_counter() - t_seed, 1)
    record["held_out"] = batches["templated"]
    record["edits"] = edits
    return record


def worker_argv(
    args: argparse.Namespace, seed: int, members: list[str], root: Path, group: str, threads: int, out: Path
) -> list[str]:
    """The command line of a worker that runs one seed of this comparison (in its own process)."""
    argv = [
        "--worker-seed", str(seed), "--worker-out", str(out), "--foundations", str(root), "--no-build",
        "--steps", str(args.steps), "--align-steps", str(args.align_steps), "--eval-pairs", str(args.eval_pairs),
        "--members", *members,
        "--threads", str(threads), "--wandb-project", args.wandb_project, "--wandb-dir", str(args.wandb_dir),
        "--wandb-group", group,
    ]  # fmt: skip
    for option in ("batch_size", "max_minutes", "inference_steps", "text_guidance", "image_guidance"):
        if getattr(args, option) is not None:
            argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return argv + (["--no-wandb"] if args.no_wandb else [])


def run_workers(args: argparse.Namespace, members: list[str], root: Path, group: str) -> dict[int, dict[str, Any]]:
    """Every seed in its own process, ``--jobs`` at a time, each with ``cores // jobs`` torch threads."""
    jobs = min(args.jobs, len(args.seeds))
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // jobs)
    records: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="zoo-seeds-") as work:
        pending, running = list(args.seeds), []
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    seed = pending.pop(0)
                    argv = worker_argv(args, seed, members, root, group, threads, Path(work))
                    print(f"[seed {seed}] worker: python benchmarks/zoo.py {' '.join(argv)}", flush=True)
                    running.append((seed, subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv])))
                for seed, process in list(running):
                    if process.poll() is None:
                        continue
                    running.remove((seed, process))
                    if process.returncode != 0:
                        raise UserError(f"benchmarks/zoo.py: the worker of seed {seed} exited {process.returncode}")
                    records[seed] = torch.load(Path(work) / f"seed{seed}.pt", weights_only=False)
                time.sleep(1)
        finally:
            for _, process in running:  # a failed seed, or an interrupt, ends the others
                process.terminate()
                process.wait()
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Ensure the foundations, train and score every member per seed, summarize, write the results."""
    args = parse_args(argv)
    started = time.perf_counter()
    pad_heap()  # as the insightedit command does: freed activations stay in the heap (insightedit/allocator.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    root = args.foundations or default_root()
    os.environ[FOUNDATIONS_ENV] = str(root)  # the tiny yamls' ${oc.env:INSIGHTEDIT_FOUNDATIONS,...}
    members, notes = available_members(args.members)
    group = args.wandb_group or f"zoo-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    if args.worker_seed is not None:  # one seed of a parallel run: its record for the parent
        record = run_seed(args, args.worker_seed, members, root, group)
        torch.save(record, args.worker_out / f"seed{args.worker_seed}.pt")
        return record
    for member, note in notes.items():
        print(f"{member}: {note}", flush=True)
    phases: dict[str, float] = {}

    print(f"[foundations] {'checking' if args.no_build else 'ensuring'} {root}", flush=True)
    t = time.perf_counter()
    foundations = ensure_foundations(root, build=not args.no_build, jobs=max(1, args.jobs))
    phases["foundations"] = round(time.perf_counter() - t, 1)
    for name, found in foundations.items():
        print(f"  {name}: held-out {found['metric']}, built in {found['build_minutes']} min", flush=True)

    _, test = test_settings(read_config(SHARED), args)
    results: dict[str, Any] = {
        **provenance(),
        "machine": machine(),
        "foundations_root": str(root),
        "foundations": foundations,
        "seeds": args.seeds,
        "jobs": min(args.jobs, len(args.seeds)),
        "steps": args.steps,
        "align_steps": args.align_steps,
        "batch_size": seed_data_args(read_config(SHARED), 0, args.batch_size)["batch_size"],
        "eval_pairs_asked": args.eval_pairs,
        "evaluation": dataclasses.asdict(test),
        "members": members,
        "notes": notes,
        "wandb": {"project": args.wandb_project, "group": group, "dir": str(args.wandb_dir)},
        "phases_seconds": phases,
        "per_seed": {},
    }
    t = time.perf_counter()
    if args.jobs > 1 and len(args.seeds) > 1:
        records = run_workers(args, members, root, group)
    else:
        records = {seed: run_seed(args, seed, members, root, group) for seed in args.seeds}
    phases["seeds"] = round(time.perf_counter() - t, 1)
    first = records[args.seeds[0]]
    for seed in args.seeds:
        record = records[seed]
        phases[f"seed {seed}"] = record["seconds"]
        results["per_seed"][str(seed)] = {k: v for k, v in record.items() if k not in ("held_out", "edits")}
    results["protocol"], results["starting_points"] = first["protocol"], first["starting_points"]

    steps = {
        f"{row} seed {seed}": run["steps"]
        for seed, per_seed in results["per_seed"].items()
        for row, run in per_seed["runs"].items()
        if "steps" in run
    }
    results["equal_steps"] = len(set(steps.values())) <= 1
    if not results["equal_steps"]:
        print(f"WARNING: members trained unequal steps (--max-minutes): {steps}", flush=True)
    summary = zoo_stats.summarize({int(s): p["scores"] for s, p in results["per_seed"].items()})
    results["summary"] = zoo_stats.as_json(summary)
    results["orderings"] = zoo_stats.ordering_lines(summary)
    results["target"] = zoo_stats.target_check(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    grid = args.out / "zoo_edits.png"
    if first["edits"]:
        picture(first["held_out"], first["edits"], grid, 2, 3)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["wandb"]["comparison_run"] = log_comparison(args, group, results, grid) if first["edits"] else None
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["peak_rss_mib"] = {  # Linux: ru_maxrss in KiB
        "main process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "largest child (seed worker or foundation build)": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        ),
    }
    table = zoo_stats.markdown(summary, args.seeds, first["lpips_label"])
    (args.out / "zoo_results.md").write_text(header(results, test, notes) + table + "\n")
    (args.out / "zoo_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    print(f"wrote {args.out / 'zoo_results.md'}, zoo_results.json and {grid} in {results['wall_seconds'] / 60:.1f} min")
    return results


def header(results: dict[str, Any], test: TestSettings, notes: dict[str, str]) -> str:
    """The results file's head: command, commit, machine, foundations, time per phase and per run."""
    found = ", ".join(
        f"{name} ({zoo_stats_metric(r['metric'])}; built in {r['build_minutes']} min"
        f"{', this run' if r['built_by_this_run'] else ''})"
        for name, r in results["foundations"].items()
    )
    phases = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in results["phases_seconds"].items())
    threads = "/".join(sorted({str(p["torch_threads"]) for p in results["per_seed"].values()}))
    lines = [
        f"# The zoo on equal terms, on the tiny foundations ({results['date']})",
        "",
        f"`{results['command']}` at `{results['commit']}`; {results['machine']['affinity_cores']} cores, "
        f"{results['jobs']} seed(s) at a time with {threads} torch thread(s) each "
        f"(load {results['machine']['load_average_at_start'][0]:.1f} at start); "
        f"wall time {results['wall_seconds'] / 60:.1f} min (per phase, min: {phases}); peak RSS (MiB) "
        + ", ".join(f"{name} {mib}" for name, mib in results["peak_rss_mib"].items())
        + ".",
        "",
        f"Foundations in `{results['foundations_root']}`: {found}. Every member: {align_text(results)}stage 3, "
        f"{results['steps']} steps, batch {results['batch_size']}, data seeds {results['seeds']} (the synthetic "
        f"world's, the split's and the training seed); {results['per_seed'][str(results['seeds'][0])]['eval_pairs']} "
        f"held-out pairs per seed, protocol {test.protocol} at {test.resolution} px, {test.num_inference_steps} DDIM "
        f"steps, guidance text {test.text_guidance} / image {test.image_guidance}.",
        "",
        "Minutes of CPU training on the 32-px synthetic twin: never comparable with the paper's numbers "
        "(docs/deviations.md#6-the-comparison-on-the-twin).",
        "",
        *(
            ["Where a member has an align stage, its steps and seconds read *align + stage 3*.", ""]
            if results.get("align_steps")
            else []
        ),
        "| run | " + " | ".join(f"seed {s}: steps, train s, edit s" for s in results["seeds"]) + " |",
        "|---|" + "---|" * len(results["seeds"]),
    ]
    rows = list(results["per_seed"][str(results["seeds"][0])]["runs"])
    for row in rows:
        cells = []
        for seed in results["seeds"]:
            run = results["per_seed"][str(seed)]["runs"].get(row, {})
            aligned = run.get("align")
            before = f"{aligned['steps']} + " if aligned else ""
            seconds = f"{aligned['seconds']} + " if aligned else ""
            cells.append(
                f"{before}{run.get('steps', '–')}, {seconds}{run.get('seconds', '–')}, {run.get('edit_seconds', '–')}"
            )
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", *([] if results["equal_steps"] else ["**Unequal steps (stopped by --max-minutes).**", ""])]
    lines += [*(f"- {member}: {note}" for member, note in notes.items()), ""]
    return "\n".join(lines) + "\n"


def align_text(results: dict[str, Any]) -> str:
    """How the members started stage 3, for the header: from their align stage (its steps) or the foundations."""
    steps = results.get("align_steps") or 0
    if not steps:
        return "from the foundations, "
    return (
        f"from the foundations, the members with an align stage (stage 1: no UNet, L_align) first {steps} steps "
        "of it at their tiny learning rates, as the paper orders the stages, then "
    )


def zoo_stats_metric(metric: dict[str, float] | None) -> str:
    """A foundation's held-out metric, short."""
    return ", ".join(f"{k} {v:.3g}" for k, v in (metric or {}).items()) or "no metric recorded"


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
