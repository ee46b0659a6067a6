"""Do the tiny members of the zoo learn to edit? Trained vs untrained vs the identity edit.

Trains tiny members of the zoo (``--members``, default ``insightedit``, ``insightedit_no_iaa`` and
``instruct_pix2pix``) with the model, data and learning rates of ``--config`` (default
``lightning_configs/tiny/stage3.yaml``; each member keeps the sections and stage settings it reads) on the
synthetic AdvancedEdit twin, then edits held-out pairs (whole source images never seen in training)
and reports, in one run, PSNR to the target *inside* the edit mask and *outside* it for:

- ``identity``: output = source (inside: how far the target is from the source; outside: exact, ∞);
- ``untrained``: the first member before training (same seed, same sampler);
- ``trained (<member>)``: each member after ``trainer.max_steps`` stage-3 steps. ``insightedit_no_iaa`` is
  the paper's ablation (no Mapper, no CLIP tower, no image branch, no ``L_IAA``), ``instruct_pix2pix``
  the baseline the paper improves: the same UNet and diffusion settings conditioned on the frozen text
  encoder's encoding of the instruction, no MLLM and no bridge.

Held-out pairs are scored twice: with their templated instruction (``remove the red circle``) and with a
reasoning phrasing (``Remove the smallest object.``), one table each.

PSNR is per image (data range 1, images in [0, 1], the masked pixels' MSE over all three channels),
capped at :data:`insightedit.evaluation.metrics.PSNR_CAP_DB`, then averaged, overall and per task type.
Every member is an :class:`~insightedit.systems.editor_system.EditorSystem` and edits through
``system.edit(source, mllm_source, instructions, ...)``. Sampling is DDIM with the member's own scheduler
and guidance 1 (``--text-guidance``/``--image-guidance``).
Writes ``learning.json``, ``learning.md`` and ``learning_edits.png`` (source | edited | target, with
the instruction) under ``--out``.

    python benchmarks/learning.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont
from provenance import provenance  # benchmarks/provenance.py (the script's folder is on sys.path)

from insightedit.data import AdvancedEditDataModule
from insightedit.evaluation.metrics import PSNR_CAP_DB
from insightedit.models.zoo import MEMBERS, SECTIONS, get_member
from insightedit.systems.editor_system import EditorSystem

TASKS = ("remove", "add", "replace")


class StepTimer(L.Callback):
    """Wall time of the training steps and the training loss every ``every`` steps."""

    def __init__(self, every: int = 25) -> None:
        self.every = every
        self.start = 0.0
        self.losses: list[tuple[int, float, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            elapsed = time.perf_counter() - self.start
            self.losses.append((step, loss, elapsed))
            print(f"  step {step:5d}  loss {loss:.4f}  {elapsed:7.1f}s", flush=True)


def load_config(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The model, data and trainer sections of a LightningCLI yaml (model/data ``init_args``)."""
    config: Any = OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=True)  # the foundations root
    return config["model"]["init_args"], config["data"]["init_args"], config.get("trainer", {})


def member_args(model_args: dict[str, Any], member: str) -> dict[str, Any]:
    """The config's model arguments for ``member``: the sections, options and stage settings it reads.

    A stage-3 InsightEdit config becomes, e.g., the InstructPix2Pix member with the same generation
    section, the UNet's learning rate and the same weight decay and warmup.
    """
    entry = get_member(member)
    editor = entry.editor_class()
    args = copy.deepcopy(model_args)
    args["member"] = member
    for section in SECTIONS:
        if section not in entry.sections:
            args.pop(section, None)
    if "align_target" not in entry.options:
        args.pop("align_target", None)
    settings = dict(args.get("stage_settings") or {})
    if settings.get("learning_rates"):
        settings["learning_rates"] = {
            k: v for k, v in settings["learning_rates"].items() if k in editor.optimizer_groups
        }
    if settings.get("loss_weights"):
        settings["loss_weights"] = {k: v for k, v in settings["loss_weights"].items() if k in editor.losses}
    if settings.get("train"):
        settings["train"] = [group for group in settings["train"] if group in editor.groups]
    args["stage_settings"] = settings or None
    return args


def held_out_batches(
    data: AdvancedEditDataModule, count: int, batch_size: int, reasoning_probability: float
) -> list[dict[str, Any]]:
    """``count`` held-out samples (the same pairs for every call), phrased templated (0) or reasoning (1)."""
    torch.manual_seed(1234)
    import random

    random.seed(1234)
    dataset = data.datasets["val"]
    config = dataset.builder.config
    dataset.builder.config = dataclasses.replace(config, reasoning_probability=reasoning_probability)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()[:count]
    samples = [dataset[i] for i in order]
    dataset.builder.config = config
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch: dict[str, Any] = {}
        for key in ("source", "target", "mask", "mllm_source"):
            if key in chunk[0]:
                batch[key] = torch.stack([s[key] for s in chunk])
        for key in ("instruction", "task_type", "record_id"):
            batch[key] = [s[key] for s in chunk]
        batches.append(batch)
    return batches


def masked_psnr(edited: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> list[float]:
    """Per-image PSNR (dB, data range 1) over the pixels where ``region`` (B, 1, H, W) is 1; capped."""
    weights = region.expand_as(edited)
    mse = ((edited - target) ** 2 * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp(min=1)
    return [min(PSNR_CAP_DB, -10 * math.log10(m)) if m > 0 else PSNR_CAP_DB for m in mse.tolist()]


@torch.no_grad()
def evaluate(
    system: EditorSystem | None, batches: list[dict[str, Any]], sampling: dict[str, Any]
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """PSNR inside/outside the mask per task type; ``system=None`` is the identity edit."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"in": [], "out": []})
    outputs = []
    if system is not None:
        system.eval()
    for index, batch in enumerate(batches):
        if system is None:
            edited = batch["source"]
        else:
            generator = torch.Generator().manual_seed(index)
            edited = system.edit(
                batch["source"], batch.get("mllm_source"), batch["instruction"], generator=generator, **sampling
            )
        outputs.append(edited)
        edited01, target01 = (edited + 1) / 2, (batch["target"] + 1) / 2
        mask = (batch["mask"] > 0.5).float()
        inside, outside = masked_psnr(edited01, target01, mask), masked_psnr(edited01, target01, 1 - mask)
        for task, a, b in zip(batch["task_type"], inside, outside, strict=True):
            for key in (task, "all"):
                scores[key]["in"].append(a)
                scores[key]["out"].append(b)
    table = {
        key: {"in_mask": sum(v["in"]) / len(v["in"]), "outside": sum(v["out"]) / len(v["out"]), "n": len(v["in"])}
        for key, v in scores.items()
    }
    return table, outputs


def train(
    model_args: dict[str, Any],
    data: AdvancedEditDataModule,
    steps: int,
    seed: int,
    label: str,
    max_minutes: float | None = None,
    save_to: Path | None = None,
) -> tuple[EditorSystem, EditorSystem, dict[str, Any]]:
    """Build (seeded) and train one member; return it, an untrained copy and the run's statistics."""
    L.seed_everything(seed, verbose=False)
    system = EditorSystem(**copy.deepcopy(model_args))
    untrained = copy.deepcopy(system)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer],
        max_time={"minutes": max_minutes} if max_minutes else None,
    )  # fmt: skip
    print(f"[{label}] training {steps} steps", flush=True)
    started = time.perf_counter()
    trainer.fit(system, datamodule=data)
    seconds = time.perf_counter() - started
    done = trainer.global_step
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    stats = {"steps": done, "seconds": seconds, "steps_per_second": done / seconds, "loss_curve": timer.losses}
    return system, untrained, stats


def picture(batches: list[dict[str, Any]], edited: list[torch.Tensor], path: Path, count: int, scale: int) -> None:
    """A PNG of ``count`` held-out edits, a row each: source | edited | target, instruction below."""
    rows = []
    per_task: dict[str, int] = defaultdict(int)
    for batch, output in zip(batches, edited, strict=True):
        for i, task in enumerate(batch["task_type"]):
            if len(rows) < count and per_task[task] < math.ceil(count / len(TASKS)):
                per_task[task] += 1
                rows.append((batch["source"][i], output[i], batch["target"][i], f"[{task}] {batch['instruction'][i]}"))
    side = batches[0]["source"].shape[-1] * scale
    text_height, pad = 14, 4
    font = ImageFont.load_default()
    cols = 2
    cell_w, cell_h = 3 * side + 4 * pad, side + text_height + 2 * pad
    canvas = Image.new("RGB", (cols * cell_w, math.ceil(len(rows) / cols) * cell_h + 18), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), "held-out: source | edited (trained) | target", fill="black", font=font)
    for n, (source, output, target, caption) in enumerate(rows):
        x0, y0 = (n % cols) * cell_w, (n // cols) * cell_h + 18
        for k, image in enumerate((source, output, target)):
            pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (x0 + pad + k * (side + pad), y0 + pad))
        words, line = caption.split(), ""
        for word in words:  # one line, shortened to the cell
            if draw.textlength(line + " " + word, font=font) > cell_w - 2 * pad:
                line += "…"
                break
            line = (line + " " + word).strip()
        draw.text((x0 + pad, y0 + side + pad + 1), line, fill="black", font=font)
    canvas.save(path, optimize=True)


def markdown(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The learning table: in-mask and outside-mask PSNR, overall and per task type."""

    def fmt(value: float) -> str:
        return "∞" if value >= PSNR_CAP_DB else f"{value:.1f}"

    head = "| edit | in-mask PSNR | outside PSNR | " + " | ".join(f"{t} in / out" for t in TASKS) + " |"
    lines = [head, "|" + "---|" * (3 + len(TASKS))]
    for name, table in rows:
        cells = [fmt(table["all"]["in_mask"]), fmt(table["all"]["outside"])]
        for task in TASKS:
            t = table.get(task)
            cells.append(f"{fmt(t['in_mask'])} / {fmt(t['outside'])}" if t else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_recipe(
    model_args: dict[str, Any],
    data_args: dict[str, Any],
    data: AdvancedEditDataModule,
    args: argparse.Namespace,
    work: Path,
) -> tuple[EditorSystem, EditorSystem | None, dict[str, EditorSystem], dict[str, Any]]:
    """The paper's order on the twin: a tiny InstructPix2Pix, then stage 1 (align), [2,] 3 of each member.

    The full system starts from ``timbrooks/instruct-pix2pix``, a UNet that already reads text encodings; the
    twin's counterpart is the ``instruct_pix2pix`` member trained here first (``--pretrain-steps``, templated
    instructions only), whose checkpoint every other member of ``--members`` loads as
    ``generation.pretrained``. Each of those then runs its own stages 1 [and 2] (``init_from`` the last) and
    stage 3. Returns the InstructPix2Pix member, the first other member as it enters stage 3 and each
    member's trained system.
    """
    stats: dict[str, Any] = {}
    plain = AdvancedEditDataModule(**{**data_args, "reasoning_probability": 0.0})
    plain.prepare_data()
    plain.setup("fit")
    base = work / "instruct_pix2pix.ckpt"
    ip2p, _, stats["pretrain"] = train(
        member_args(model_args, "instruct_pix2pix"), plain, args.pretrain_steps, args.seed, "tiny InstructPix2Pix",
        save_to=base,
    )  # fmt: skip
    systems: dict[str, EditorSystem] = {}
    entering: EditorSystem | None = None
    for member in [m for m in args.members if m != "instruct_pix2pix"]:
        chain_args = member_args(model_args, member)
        chain_args["generation"] = {**(chain_args.get("generation") or {}), "pretrained": str(base)}
        previous: str | None = None
        for stage, steps in ((1, args.stage1_steps), (2, args.stage2_steps)):
            if steps <= 0:
                continue
            checkpoint = work / f"{member}_stage{stage}.ckpt"
            _, _, stats[f"{member}_stage{stage}"] = train(
                {**chain_args, "stage": stage, "init_from": previous}, data, steps, args.seed,
                f"{member} stage {stage}", args.max_minutes, save_to=checkpoint,
            )  # fmt: skip
            previous = str(checkpoint)
        systems[member], before, stats[f"{member}_stage3"] = train(
            {**chain_args, "stage": 3, "init_from": previous}, data, args.steps, args.seed, f"{member} stage 3",
            args.max_minutes,
        )  # fmt: skip
        entering = entering or before
    return ip2p, entering, systems, stats


KINDS = {"templated": 0.0, "reasoning": 1.0}  # held-out instruction phrasing -> reasoning probability
DEFAULT_MEMBERS = ["insightedit", "insightedit_no_iaa", "instruct_pix2pix"]


def main() -> None:
    """Parse arguments, train the members, evaluate every row on both phrasings, write tables and picture."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("lightning_configs/tiny/stage3.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's max_steps)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--reasoning-probability",
        type=float,
        default=None,
        help="share of reasoning phrasings in training (default: the config's)",
    )
    parser.add_argument("--eval-pairs", type=int, default=240)
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--text-guidance", type=float, default=1.0)
    parser.add_argument("--image-guidance", type=float, default=1.0)
    parser.add_argument(
        "--members", nargs="+", default=DEFAULT_MEMBERS, choices=list(MEMBERS), help="the members to train and score"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop each training run after this long")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--recipe",
        choices=["stage3", "paper"],
        default="stage3",
        help="stage3: each member trains stage 3 from scratch; paper: the tiny InstructPix2Pix member, "
        "then each other member's stages 1, 2, 3 in order from it (see paper_recipe)",
    )
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="paper recipe: InstructPix2Pix steps")
    parser.add_argument("--stage1-steps", type=int, default=400, help="paper recipe: stage-1 (align) steps")
    parser.add_argument("--stage2-steps", type=int, default=0, help="paper recipe: stage-2 steps (0: skipped)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_args, data_args, trainer_args = load_config(args.config)
    steps = args.steps or int(trainer_args.get("max_steps", 300))
    if args.batch_size:
        data_args["batch_size"] = args.batch_size
    if args.reasoning_probability is not None:
        data_args["reasoning_probability"] = args.reasoning_probability
    data = AdvancedEditDataModule(**data_args)
    data.prepare_data()
    data.setup("fit")
    held_out = {kind: held_out_batches(data, args.eval_pairs, 80, p) for kind, p in KINDS.items()}
    sampling = {
        "num_inference_steps": args.inference_steps,
        "text_guidance": args.text_guidance,
        "image_guidance": args.image_guidance,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "config": str(args.config), "steps": steps, "batch_size": data_args["batch_size"],
        "train_reasoning_probability": data_args.get("reasoning_probability", 0.5),
        "eval_pairs": len([t for b in held_out["templated"] for t in b["task_type"]]), "sampling": sampling,
        "train_images": len(data.datasets["train"]), "rows": {kind: {} for kind in KINDS}, "runs": {},
    }  # fmt: skip
    rows: dict[str, list[tuple[str, dict[str, Any]]]] = {kind: [] for kind in KINDS}

    def score(name: str, system: Any) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        for kind, batches in held_out.items():
            table, edited = evaluate(system, batches, sampling)
            rows[kind].append((name, table))
            outputs = edited if kind == "templated" else outputs
        return outputs

    def report() -> str:
        return "\n\n".join(f"{kind} instructions:\n\n{markdown(table)}" for kind, table in rows.items())

    score("identity (output = source)", None)
    trained_outputs: list[torch.Tensor] | None = None
    if args.recipe == "paper":
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            ip2p, entering, systems, stats = paper_recipe(model_args, data_args, data, args, Path(work))
        results["recipe"] = {"pretrain_steps": args.pretrain_steps, "stage1_steps": args.stage1_steps,
                             "stage2_steps": args.stage2_steps, "stage3_steps": args.steps}  # fmt: skip
        results["runs"] = stats
        ip2p_outputs = score(f"instruct_pix2pix ({args.pretrain_steps} steps, templated)", ip2p)
        if entering is not None:
            score(f"{entering.hparams['member']} at the start of stage 3", entering)
        member_outputs = [score(f"{member} after stage 3", system) for member, system in systems.items()]
        trained_outputs = member_outputs[0] if member_outputs else ip2p_outputs
    else:
        for number, member in enumerate(args.members):
            system, untrained, stats = train(
                member_args(model_args, member), data, steps, args.seed, member, args.max_minutes
            )
            if number == 0:
                score(f"untrained ({member})", untrained)
            outputs = score(f"trained ({member})", system)
            results["runs"][member] = stats
            trained_outputs = trained_outputs if trained_outputs is not None else outputs
            print(report(), flush=True)
    results["rows"] = {kind: dict(table) for kind, table in rows.items()}
    text = report()
    (args.out / "learning.json").write_text(json.dumps({**provenance(), **results}, indent=2) + "\n")
    (args.out / "learning.md").write_text(text + "\n")
    assert trained_outputs is not None
    picture(held_out["templated"], trained_outputs, args.out / "learning_edits.png", count=12, scale=3)
    print(text)
    for run, stats in results["runs"].items():
        rate = stats["steps_per_second"]
        print(f"{run}: {stats['steps']} steps in {stats['seconds']:.0f} s ({rate:.2f} steps/s)")


if __name__ == "__main__":
    main()
