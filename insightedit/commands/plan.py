"""``insightedit plan``: what a configured run needs, before any weight is downloaded.

Builds the configured system on the ``meta`` device (no memory, no download: named weights are not
loaded, the preset's architecture is), then prints per part the total and trainable parameters of the
configured stage, the estimated memory per device for the configured precision, strategy and device
count with a verdict for named GPUs (:mod:`insightedit.planning.memory`,
:mod:`insightedit.planning.hardware`), and the training FLOPs per sample by group with the GPU-hours they
take (:mod:`insightedit.planning.flops`). Answers are cached by their inputs and the code
(:mod:`insightedit.planning.cache`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from insightedit.commands.parsing import CommandParser
from insightedit.errors import UserError

WEIGHT_KEYS = {
    "comprehension": ("pretrained",),
    "generation": ("pretrained",),
    "bridging": ("clip_pretrained",),
    "head": ("pretrained",),
}
SECTIONS = ("comprehension", "bridging", "generation", "head")
SYSTEM = "insightedit.systems.editor_system.EditorSystem"
TEXT_TOKENS = 64  # assumed instruction + chat-template tokens per prompt
MLLM_PARTS = ("llava", "lora", "mm_embeddings")
UNET_PARTS = ("unet", "image_branch")


def _merge(base: Any, override: Any) -> Any:
    """Deep-merge mappings; anything else in ``override`` replaces what ``base`` had (as LightningCLI does)."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    return override


def load_config(paths: list[str]) -> dict[str, Any]:
    """Merge yaml configs left to right and resolve omegaconf interpolation (``${...}``)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged: dict[str, Any] = {}
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"config {path} not found")
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"config {path} is not valid yaml: {str(error).splitlines()[0]}") from error
        if not isinstance(loaded, dict):
            raise UserError(f"config {path} must be a mapping at the top level")
        merged = _merge(merged, loaded)
    try:
        return OmegaConf.to_container(OmegaConf.create(merged), resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise UserError(f"config interpolation failed: {str(error).splitlines()[0]}") from error


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"model.class_path {path!r} cannot be imported") from error


class _OpenClipNoWeights(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" line: a plan never loads weights, on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    quiet = _OpenClipNoWeights()
    logging.getLogger().addFilter(quiet)  # open_clip logs through the root logger
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def overlay_error(config_paths: list[str]) -> UserError:
    """The error for configs that name no model class: an overlay given alone, or a config missing its model."""
    overlays = [path for path in config_paths if not (load_config([path]).get("model") or {}).get("class_path")]
    if config_paths and len(overlays) == len(config_paths):
        given = " ".join(f"--config {path}" for path in config_paths)
        return UserError(
            f"{', '.join(overlays)} {'is an overlay' if len(overlays) == 1 else 'are overlays'} (no model.class_path): "
            f"put {'it' if len(overlays) == 1 else 'them'} after a stage or member config, e.g. "
            f"insightedit plan --config lightning_configs/stage3.yaml {given}, or use --member <name> {given}"
        )
    return UserError("the config has no model.class_path: start from lightning_configs/stage3.yaml or --member")


def build_on_meta(model_section: dict[str, Any]) -> tuple[Any, dict[str, str], str | None]:
    """The configured model on ``meta``; returns it, the weights the config names, and its quantization.

    An ``EditorSystem`` config is built as :class:`~insightedit.planning.build.PlannedSystem` (the same
    editor and stage, without importing Lightning); any other class by its ``class_path``.
    """
    import torch

    if "class_path" not in model_section:
        raise UserError("the config has no model.class_path")
    init_args = json.loads(json.dumps(model_section.get("init_args") or {}))
    if model_section["class_path"] == SYSTEM:
        from insightedit.models.zoo import resolve_section_overrides

        init_args = resolve_section_overrides(init_args)  # the sections the system builds from
    named: dict[str, str] = {}
    for section, keys in WEIGHT_KEYS.items():
        for key in keys:
            value = (init_args.get(section) or {}).pop(key, None)
            if value:
                named[f"{section}.{key}"] = str(value)
            if value and Path(str(value)).exists():  # a local folder or file: its architecture is built from
                init_args[section][key] = value  # its config files (building reads no weights)
    quantization = (init_args.get("comprehension") or {}).pop("quantization", None)
    (init_args.get("comprehension") or {}).pop("dtype", None)
    for section in SECTIONS:  # the plan applies checkpointing itself (PlanSettings); count the plain forward
        (init_args.get(section) or {}).pop("gradient_checkpointing", None)
    init_args.pop("init_from", None)
    if model_section["class_path"] == SYSTEM:
        from insightedit.planning.build import planned_system

        def build() -> Any:
            return planned_system(init_args)
    else:
        model_class = _class(model_section["class_path"])

        def build() -> Any:
            return model_class(**init_args)

    try:
        with _quiet_open_clip():
            if init_args.get("preset") == "tiny":  # small enough to build for real (its tokenizer needs real tensors)
                from insightedit.models.loading import load_pretrained

                model = build()
                load_pretrained(model)  # a local folder's tiny weights (the tiny foundations): no part left on meta
                return model, named, quantization
            with torch.device("meta"):
                return build(), named, quantization
    except (TypeError, ValueError) as error:
        raise UserError(f"model.init_args cannot build {model_section['class_path']}: {error}") from error


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, dict):
        name = str(strategy.get("class_path", "auto")).rsplit(".", 1)[-1].lower().replace("strategy", "")
        return "fsdp2" if name == "modelparallel" else name  # FSDP2: fully_shard per block, as FSDP full shard
    return str(strategy or "auto").lower()


def activation_parts(system: Any, settings: Any, clip_size: int = 224, mllm_size: int | None = None) -> dict[str, int]:
    """Activation bytes per device: the MLLM by formula, every other part by counting a training step.

    The step is the member's own :meth:`~insightedit.models.editor.Editor.compute_losses` for the configured
    stage, on ``meta`` (the tiny twin: on real tensors), with the MLLM and the frozen text encoder stood in
    for by shape (:mod:`insightedit.planning.meta_forward`); parts are named as in the parameter table.
    """
    from insightedit.planning.activations import count_saved_by_part, decoder_activation_bytes
    from insightedit.planning.inventory import part_of
    from insightedit.planning.meta_forward import example_batch, shared_modules_by_shape

    editor, stage = system.editor, system.stage
    parts: dict[str, int] = {}
    mllm = editor.mllm
    if mllm is not None:
        text_config = mllm.base_model.config.text_config
        sequence = mllm.vision_grid[0] * mllm.vision_grid[1] + TEXT_TOKENS + mllm.num_mm_tokens
        parts["llm"] = decoder_activation_bytes(
            int(text_config.num_hidden_layers), int(text_config.hidden_size), sequence, settings.batch_size,
            2 if settings.half_compute else 4, settings.llm_checkpointing,
        )  # fmt: skip
    batch = example_batch(editor, settings.batch_size, settings.resolution, clip_size, mllm_size)
    scale = 0.5 if settings.half_compute else 1.0  # counted in float32; bf16 autocast halves it
    with shared_modules_by_shape(editor):
        counted = count_saved_by_part(editor, lambda: editor.compute_losses(batch, stage), lambda n: part_of(f"{n}."))
    for part, saved in counted.items():
        if part in MLLM_PARTS:  # the stand-in keeps nothing; the formula above counts the MLLM
            continue
        checkpointed = settings.unet_checkpointing and part in UNET_PARTS
        kept = int((saved.with_checkpointing() if checkpointed else saved.total) * scale)
        if kept:  # frozen parts that run without gradients keep nothing
            parts[part] = kept
    return parts


def _device_count(override: int | None, configured: Any) -> int:
    """``--devices`` if given, else the config's integer ``trainer.devices`` (``auto`` counts as 1)."""
    if override is not None:
        return override
    return int(configured) if str(configured).isdigit() else 1


def member_config(member: str) -> dict[str, Any]:
    """The config ``--member`` stands for: the member at full size, in its final stage, defaults elsewhere."""
    from insightedit.models.zoo import get_member

    final = max(get_member(member).editor_class().stages)
    return {"model": {"class_path": SYSTEM, "init_args": {"member": member, "preset": "full", "stage": final}}}


def planned_config(config_paths: list[str], member: str | None = None) -> dict[str, Any]:
    """The merged config to plan: ``--member``'s (if given) with the ``--config`` files over it.

    An ``EditorSystem``'s ``section_overrides`` are applied to the member's sections here, as the system does.
    """
    config = _merge(member_config(member), load_config(config_paths)) if member else load_config(config_paths)
    model = config.get("model") or {}
    if not model.get("class_path"):
        raise overlay_error(config_paths)
    if model["class_path"] == SYSTEM and (model.get("init_args") or {}).get("section_overrides"):
        from insightedit.models.zoo import resolve_section_overrides

        model["init_args"] = resolve_section_overrides(model["init_args"])
    return config


def training_flops(system: Any, settings: Any, clip_size: int = 224, mllm_size: int | None = None) -> dict[str, Any]:
    """FLOPs of one training sample by group (:mod:`insightedit.planning.flops`), the MLLM at its real length."""
    from insightedit.planning.flops import checkpointed_blocks, count_training_flops, group_of_part
    from insightedit.planning.inventory import part_of
    from insightedit.planning.meta_forward import example_batch, shared_modules_by_parts

    editor, stage = system.editor, system.stage
    batch = example_batch(editor, 1, settings.resolution, clip_size, mllm_size)
    blocks = checkpointed_blocks(settings.llm_checkpointing, settings.unet_checkpointing)
    def group_of(name: str) -> str:
        return group_of_part(part_of(f"{name}."))

    with shared_modules_by_parts(editor, TEXT_TOKENS):
        return count_training_flops(editor, lambda: editor.compute_losses(batch, stage)["loss"], group_of, blocks)


def _schedule(trainer: dict[str, Any], settings: Any) -> dict[str, Any]:
    """Samples the config's own run trains: max_steps × batch × processes × accumulation."""
    per_step = settings.batch_size * settings.world_size * int(trainer.get("accumulate_grad_batches", 1))
    steps = int(trainer.get("max_steps", -1))
    return {"max_steps": steps, "samples_per_step": per_step, "samples": steps * per_step if steps > 0 else None}


def make_plan(
    config_paths: list[str],
    devices: int | None = None,
    member: str | None = None,
    mfu: float | None = None,
    epochs: float = 1.0,
) -> dict[str, Any]:
    """The plan as one JSON-ready dict: modules, memory and GPU verdicts, FLOPs and GPU-hours, method."""
    from insightedit.planning.hardware import DEFAULT_MFU
    from insightedit.planning.inventory import count_modules
    from insightedit.planning.memory import PlanSettings, plan_memory
    from insightedit.planning.report import fits_on_gpus, time_on_gpus

    config = planned_config(config_paths, member)
    system, named, quantization = build_on_meta(config.get("model") or {})
    trainer = config.get("trainer") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    init_args = (config.get("model") or {}).get("init_args") or {}
    configured_devices = trainer.get("devices", 1)
    strategy = _strategy_name(trainer.get("strategy", "auto"))
    # FSDP2's per-block activation checkpointing (the model's `sharding:` section) covers the LLM and the UNet
    sharding = init_args.get("sharding") or {}
    sharded_checkpointing = strategy == "fsdp2" and bool(sharding.get("activation_checkpointing"))
    settings = PlanSettings(
        precision=str(trainer.get("precision", "32-true")),
        strategy=strategy,
        devices=_device_count(devices, configured_devices),
        num_nodes=int(trainer.get("num_nodes", 1)),
        batch_size=int(data.get("batch_size", 1)),
        resolution=int(data.get("resolution", 256)),
        quantization=quantization,
        llm_dtype=(init_args.get("comprehension") or {}).get("dtype"),
        llm_checkpointing=sharded_checkpointing
        or bool((init_args.get("comprehension") or {}).get("gradient_checkpointing", False)),
        unet_checkpointing=sharded_checkpointing
        or bool((init_args.get("generation") or {}).get("gradient_checkpointing", False)),
    )
    if settings.devices > 1 and settings.strategy == "auto":
        settings.strategy = "ddp"
    counts = count_modules(system)
    sizes = {"clip_size": int(data.get("clip_size", 224)), "mllm_size": data.get("mllm_size")}
    memory = plan_memory(system, counts, settings, activation_parts(system, settings, **sizes))
    flops = training_flops(system, settings, **sizes)
    per_sample = sum(group.total for group in flops.values())
    schedule = _schedule(trainer, settings)
    stage = getattr(system, "stage", None)
    hparams = getattr(system, "hparams", {})
    return {
        "config": config_paths,
        "member": init_args.get("member", hparams.get("member")),
        "stage_number": init_args.get("stage", hparams.get("stage")),
        "stage": stage.as_dict() if stage is not None else None,
        "modules": {name: count.as_dict() for name, count in counts.items()},
        "total": {
            "params": sum(c.params for c in counts.values()),
            "trainable": sum(c.trainable for c in counts.values()),
        },
        "memory": memory.as_dict(),
        "fits": fits_on_gpus(memory.total),
        "flops_per_sample": {
            "groups": {name: group.as_dict() for name, group in flops.items()},
            "total": per_sample,
            "resolution": settings.resolution,
            "mllm_text_tokens": TEXT_TOKENS,
        },
        "gpu_hours": time_on_gpus(per_sample, epochs, schedule, settings.world_size, mfu or DEFAULT_MFU),
        "weights_named": named,
        "method": {
            "build": "built on the meta device from the preset's architecture (named weights are not loaded)",
            "activations": (
                "MLLM by Korthikanti et al. 2022 (34·s·h bytes per layer, 16-bit, fused attention; "
                f"s = vision patches + {TEXT_TOKENS} text tokens + r); every other part by counting the tensors "
                "autograd saves in the member's own training step, run on the meta device"
            ),
            "flops": (
                "one training sample's forward and backward of the member's own step on the meta device, "
                "counted by torch.utils.flop_counter's formulas (2 per multiply-add; matrix products, "
                "convolutions, attention); the MLLM runs its own layers at "
                f"s = vision patches + {TEXT_TOKENS} text tokens + r; frozen layers compute input gradients "
                "only where something before them trains, no weight gradients; gradient checkpointing adds "
                "one more forward of each checkpointed block the backward runs through (recompute); stacks of "
                "identical transformer layers are counted from two layers (the same count, tested)"
            ),
            "fits": (
                "a card fits when estimate + 1.0 GiB CUDA context + 10% of the estimate (allocator fragmentation, "
                "transients) is within its memory (nvidia-smi total); tight: it fits with the context but not the 10%"
            ),
            "gpu_hours": (
                "FLOPs per sample x samples / (dense bf16 peak x MFU); samples: --epochs over the paper's "
                "202,822 pairs (the paper states no schedule: 1 epoch per stage assumed) and the config's own "
                "max_steps x batch x processes x accumulate_grad_batches"
            ),
        },
    }


def main(argv: list[str]) -> int:
    """Entry point of ``insightedit plan``."""
    parser = CommandParser(prog="insightedit plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="yaml config (repeat to compose)")
    parser.add_argument(
        "--member",
        default=None,
        help="plan this member of the zoo at full size in its final stage (`insightedit zoo`); "
        "--config files given too are merged over it (e.g. an fsdp2_8gpu.yaml overlay)",
    )
    parser.add_argument("--devices", type=int, default=None, help="devices per node (overrides the config)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--edit", action="store_true", help="plan the memory of one edit instead of training")
    parser.add_argument("--resolution", type=int, default=512, help="edit resolution for --edit (default 512)")
    parser.add_argument(
        "--mfu", type=float, default=None, help="model FLOP utilisation assumed for GPU-hours (default 0.4)"
    )
    parser.add_argument(
        "--epochs", type=float, default=1.0, help="epochs over the paper's 202,822 pairs for GPU-hours (default 1)"
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute even if a cached answer exists")
    args = parser.parse_args(argv)
    if not args.config and not args.member:
        raise UserError("plan needs --config <yaml> or --member <name>")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs}")
    from insightedit.planning.cache import PlanCache

    config = load_config(args.config)  # the member's own config is the code's: the cache key holds its name
    if not args.member and not (config.get("model") or {}).get("class_path"):
        raise overlay_error(args.config)
    key = {"config": config, "member": args.member, "devices": args.devices, "edit": args.edit}
    key |= {"resolution": args.resolution} if args.edit else {"mfu": args.mfu, "epochs": args.epochs}
    cache = PlanCache(key, enabled=not args.no_cache)
    answer = cache.load()
    if answer is None:
        answer = _compute(args)
        cache.save(answer)
    if args.json:
        print(json.dumps(answer["data"], indent=2))
    else:
        print(answer["text"])
    return 0


def _compute(args: argparse.Namespace) -> dict[str, Any]:
    """The plan's data and text for the parsed arguments."""
    if args.edit:
        from insightedit.planning.edit_memory import format_edit_plan, plan_edit_memory

        system, _, _ = build_on_meta(planned_config(args.config, args.member).get("model") or {})
        rows = plan_edit_memory(system, args.resolution)
        return {"data": [row.as_dict() for row in rows], "text": format_edit_plan(rows, args.resolution)}
    from insightedit.planning.report import format_plan

    plan = make_plan(args.config, args.devices, args.member, args.mfu, args.epochs)
    return {"data": plan, "text": format_plan(plan)}
