"""Does the tiny stage-3 InsightEdit system learn to edit? Trained vs untrained vs the identity edit.

Trains the tiny stage-3 system of ``--config`` (default ``lightning_configs/tiny/stage3.yaml``) on the
synthetic AdvancedEdit twin, then edits held-out pairs (whole source images never seen in training)
and reports, in one run, PSNR to the target *inside* the edit mask and *outside* it for:

- ``identity``: output = source (inside: how far the target is from the source; outside: exact, ∞);
- ``untrained``: the same system before training (same seed, same sampler);
- ``trained``: the system after ``trainer.max_steps`` steps;
- ``trained w/o IAA``: the paper's ablation on the twin — stage 3 without the IAA stream: no
  ``L_IAA``, the Mapper frozen and the image branch's weight λ = 0, everything else equal;
- ``InstructPix2Pix-style`` (``--variants ip2p``): the same UNet and diffusion settings conditioned on the
  frozen text encoder's encoding of the instruction, no MLLM and no bridge (the baseline the paper improves).

Held-out pairs are scored twice: with their templated instruction (``remove the red circle``) and with a
reasoning phrasing (``Remove the smallest object.``), one table each.

PSNR is per image (data range 1, images in [0, 1], the masked pixels' MSE over all three channels),
capped at :data:`insightedit.evaluation.metrics.PSNR_CAP_DB`, then averaged, overall and per task type.
Sampling is DDIM with the module's own scheduler and guidance 1 (``--text-guidance``/``--image-guidance``).
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
import yaml
from PIL import Image, ImageDraw, ImageFont

from insightedit.data import AdvancedEditDataModule
from insightedit.evaluation.metrics import PSNR_CAP_DB
from insightedit.systems.generation import GenerationModule
from insightedit.systems.insightedit import InsightEditSystem
from insightedit.systems.stages import GROUPS

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
    config = yaml.safe_load(path.read_text())
    return config["model"]["init_args"], config["data"]["init_args"], config.get("trainer", {})


def without_iaa(model_args: dict[str, Any]) -> dict[str, Any]:
    """Stage 3 without the IAA stream: no ``L_IAA``, Mapper frozen, image branch weight λ = 0."""
    args = copy.deepcopy(model_args)
    settings = dict(args.get("stage_settings") or {})
    settings["train"] = [g for g in settings.get("train", GROUPS) if g != "mapper"]
    weights = dict(settings.get("loss_weights") or {"llm": 1.0, "iaa": 1.0, "align": 1.0, "diff": 1.0})
    weights.pop("iaa", None)
    settings["loss_weights"] = weights
    args["stage_settings"] = settings
    args["generation"] = {**(args.get("generation") or {}), "image_scale": 0.0}
    return args


def ip2p_args(model_args: dict[str, Any]) -> dict[str, Any]:
    """GenerationModule settings of an InstructPix2Pix-style editor on the system's UNet: no image branch."""
    generation = dict(model_args.get("generation") or {})
    generation.pop("image_scale", None)
    generation.pop("num_image_tokens", None)
    rates = (model_args.get("stage_settings") or {}).get("learning_rates") or {}
    return {
        "preset": model_args.get("preset", "tiny"), **generation, "image_embed_dim": 0,
        "learning_rate": float(rates.get("unet", 1e-4)), "weight_decay": float(model_args.get("weight_decay", 0.0)),
    }  # fmt: skip


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
    system: InsightEditSystem | GenerationModule | None, batches: list[dict[str, Any]], sampling: dict[str, Any]
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """PSNR inside/outside the mask per task type; ``system=None`` is the identity edit."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"in": [], "out": []})
    outputs = []
    if system is not None:
        system.eval()
    for index, batch in enumerate(batches):
        if system is None:
            edited = batch["source"]
        elif isinstance(system, GenerationModule):
            generator = torch.Generator().manual_seed(index)
            edited = system.edit(batch["source"], instructions=batch["instruction"], generator=generator, **sampling)
        else:
            generator = torch.Generator().manual_seed(index)
            edited = system.edit(
                batch["source"], batch["mllm_source"], batch["instruction"], generator=generator, **sampling
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
    module: type[L.LightningModule] = InsightEditSystem,
    save_to: Path | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Build (seeded) and train one system; return it, an untrained copy and the run's statistics."""
    L.seed_everything(seed, verbose=False)
    system = module(**copy.deepcopy(model_args))
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


def save_as_instruct_pix2pix(generation: GenerationModule, folder: Path) -> Path:
    """Write a trained text-conditioned module in InstructPix2Pix's hub layout (unet/, scheduler/, text_encoder/,
    tokenizer/): the tiny twin of ``timbrooks/instruct-pix2pix``, loadable as ``generation.pretrained``."""
    generation.unet.unet.save_pretrained(folder / "unet")
    generation.noise_scheduler.save_pretrained(folder / "scheduler")
    assert generation.text_encoder is not None and generation.text_encoder.tokenizer is not None
    generation.text_encoder.model.save_pretrained(folder / "text_encoder")
    generation.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def paper_recipe(
    model_args: dict[str, Any],
    data_args: dict[str, Any],
    data: AdvancedEditDataModule,
    args: argparse.Namespace,
    work: Path,
) -> tuple[GenerationModule, InsightEditSystem, dict[str, InsightEditSystem], dict[str, Any]]:
    """The paper's order on the twin: a tiny InstructPix2Pix UNet, then stage 1 (align), [2,] 3, each from the last.

    The full system starts from ``timbrooks/instruct-pix2pix``, a UNet that already reads text encodings; the
    twin's counterpart is trained here first (``--pretrain-steps``, templated instructions only). Stage 1 then
    aligns the MLLM + Q-Former to that text space, and stage 3 trains everything together, once per
    variant of ``--variants`` (``iaa``, ``no_iaa``), both from the same earlier stages. Returns the
    InstructPix2Pix-style module, the system entering stage 3 and the trained system of each variant.
    """
    stats: dict[str, Any] = {}
    plain = AdvancedEditDataModule(**{**data_args, "reasoning_probability": 0.0})
    plain.prepare_data()
    plain.setup("fit")
    ip2p, _, stats["pretrain"] = train(
        ip2p_args(model_args), plain, args.pretrain_steps, args.seed, "tiny InstructPix2Pix", module=GenerationModule
    )
    base = save_as_instruct_pix2pix(ip2p, work / "instruct-pix2pix-tiny")
    generation = {**(model_args.get("generation") or {}), "pretrained": str(base)}
    previous: str | None = None
    for stage, steps in ((1, args.stage1_steps), (2, args.stage2_steps)):
        if steps <= 0:
            continue
        stage_args = {**copy.deepcopy(model_args), "stage": stage, "generation": generation, "init_from": previous}
        checkpoint = work / f"stage{stage}.ckpt"
        _, _, stats[f"stage{stage}"] = train(
            stage_args, data, steps, args.seed, f"stage {stage}", args.max_minutes, save_to=checkpoint
        )
        previous = str(checkpoint)
    systems: dict[str, InsightEditSystem] = {}
    entering: InsightEditSystem | None = None
    for variant in [v for v in args.variants if v in ("iaa", "no_iaa")]:
        variant_args = copy.deepcopy(model_args) if variant == "iaa" else without_iaa(model_args)
        variant_args.update(stage=3, init_from=previous)
        variant_args["generation"] = {**variant_args.get("generation", {}), "pretrained": str(base)}
        systems[variant], before, stats[f"stage3_{variant}"] = train(
            variant_args, data, args.steps, args.seed, f"stage 3 ({variant})", args.max_minutes
        )
        entering = entering or before
    assert entering is not None, "the paper recipe needs the iaa and/or no_iaa variant"
    return ip2p, entering, systems, stats


KINDS = {"templated": 0.0, "reasoning": 1.0}  # held-out instruction phrasing -> reasoning probability
LABELS = {"iaa": "stage 3", "no_iaa": "stage 3 w/o IAA", "ip2p": "InstructPix2Pix-style, same UNet"}


def main() -> None:
    """Parse arguments, train the variants, evaluate every row on both phrasings, write tables and picture."""
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
    parser.add_argument("--variants", nargs="+", default=["iaa", "no_iaa", "ip2p"], choices=list(LABELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop each training run after this long")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--recipe",
        choices=["stage3", "paper"],
        default="stage3",
        help="stage3: each variant trains stage 3 from scratch; paper: tiny InstructPix2Pix UNet, "
        "then stages 1, 2, 3 in order (see paper_recipe)",
    )
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="paper recipe: InstructPix2Pix-style steps")
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
        score(f"InstructPix2Pix-style, same UNet ({args.pretrain_steps} steps, templated)", ip2p)
        score("InsightEdit after stage 1 (stage-3 start)", entering)
        for variant, system in systems.items():
            outputs = score(f"InsightEdit after {LABELS[variant]}", system)
            trained_outputs = trained_outputs or outputs
        args.variants = []
    for variant in args.variants:
        label = LABELS[variant]
        if variant == "ip2p":
            system, untrained, stats = train(
                ip2p_args(model_args), data, steps, args.seed, label, args.max_minutes, module=GenerationModule
            )
        else:
            variant_args = model_args if variant == "iaa" else without_iaa(model_args)
            system, untrained, stats = train(variant_args, data, steps, args.seed, label, args.max_minutes)
            if variant == "iaa":
                score(f"untrained ({label})", untrained)
        outputs = score(f"trained ({label})", system)
        results["runs"][variant] = stats
        if trained_outputs is None:
            trained_outputs = outputs
        print(report(), flush=True)
    results["rows"] = {kind: dict(table) for kind, table in rows.items()}
    text = report()
    (args.out / "learning.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "learning.md").write_text(text + "\n")
    assert trained_outputs is not None
    picture(held_out["templated"], trained_outputs, args.out / "learning_edits.png", count=12, scale=3)
    print(text)
    for variant, stats in results["runs"].items():
        rate = stats["steps_per_second"]
        print(f"{variant}: {stats['steps']} steps in {stats['seconds']:.0f} s ({rate:.2f} steps/s)")


if __name__ == "__main__":
    main()
