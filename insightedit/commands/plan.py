"""``insightedit plan``: what a configured run needs, before any weight is downloaded.

Builds the configured system on the ``meta`` device (no memory, no download: named weights are not
loaded, the preset's architecture is), then prints per part the total and trainable parameters of the
configured stage and the estimated memory per device for the configured precision, strategy and device
count (see :mod:`insightedit.planning.memory` for the method).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

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


def build_on_meta(model_section: dict[str, Any]) -> tuple[Any, dict[str, str], str | None]:
    """The configured model on ``meta``; returns it, the weights the config names, and its quantization."""
    import torch

    if "class_path" not in model_section:
        raise UserError("the config has no model.class_path")
    init_args = json.loads(json.dumps(model_section.get("init_args") or {}))
    named: dict[str, str] = {}
    for section, keys in WEIGHT_KEYS.items():
        for key in keys:
            value = (init_args.get(section) or {}).pop(key, None)
            if value:
                named[f"{section}.{key}"] = str(value)
    quantization = (init_args.get("comprehension") or {}).pop("quantization", None)
    (init_args.get("comprehension") or {}).pop("dtype", None)
    for section in SECTIONS:  # the plan applies checkpointing itself (PlanSettings); count the plain forward
        (init_args.get(section) or {}).pop("gradient_checkpointing", None)
    init_args.pop("init_from", None)
    model_class = _class(model_section["class_path"])
    try:
        if init_args.get("preset") == "tiny":  # small enough to build for real (its tokenizer needs real tensors)
            return model_class(**init_args), named, quantization
        with torch.device("meta"):
            system = model_class(**init_args)
    except (TypeError, ValueError) as error:
        raise UserError(f"model.init_args cannot build {model_section['class_path']}: {error}") from error
    return system, named, quantization


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
    """The merged config to plan: ``--member``'s (if given) with the ``--config`` files over it."""
    config = _merge(member_config(member), load_config(config_paths)) if member else load_config(config_paths)
    return config


def make_plan(config_paths: list[str], devices: int | None = None, member: str | None = None) -> dict[str, Any]:
    """The plan as one JSON-ready dict: ``modules`` ({name: {params, trainable}}), memory, method."""
    from insightedit.planning.inventory import count_modules
    from insightedit.planning.memory import PlanSettings, plan_memory

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
    stage = getattr(system, "stage", None)
    return {
        "config": config_paths,
        "member": init_args.get("member", getattr(system, "hparams", {}).get("member")),
        "stage": stage.as_dict() if stage is not None else None,
        "modules": {name: count.as_dict() for name, count in counts.items()},
        "total": {
            "params": sum(c.params for c in counts.values()),
            "trainable": sum(c.trainable for c in counts.values()),
        },
        "memory": memory.as_dict(),
        "weights_named": named,
        "method": (
            "built on the meta device from the preset's architecture (named weights are not loaded); "
            "activations: MLLM by Korthikanti et al. 2022 (34·s·h bytes per layer, 16-bit, fused attention; "
            f"s = vision patches + {TEXT_TOKENS} text tokens + r); every other part by counting the tensors "
            "autograd saves in the member's own training step, run on the meta device"
        ),
    }


def format_plan(plan: dict[str, Any]) -> str:
    """A human-readable table of the plan."""
    lines = []
    stage = plan["stage"]
    if stage:
        member = f"{plan['member']} " if plan.get("member") else ""
        lines.append(f"{member}stage {stage['name']}: trains {', '.join(stage['train'])}")
    lines.append(f"{'part':<20} {'params':>15} {'trainable':>15}")
    for name, count in plan["modules"].items():
        lines.append(f"{name:<20} {count['params']:>15,} {count['trainable']:>15,}")
    lines.append(f"{'total':<20} {plan['total']['params']:>15,} {plan['total']['trainable']:>15,}")
    memory = plan["memory"]
    s = memory["settings"]
    lines += [
        "",
        f"memory per device: {s['strategy']} x {s['world_size']}, {s['precision']}, batch {s['batch_size']} "
        f"per device at {s['resolution']}px" + (f", LLM {s['quantization']}" if s["quantization"] else ""),
    ]
    for kind, gib in memory["gib_per_device"].items():
        lines.append(f"  {kind:<30} {gib:>8.2f} GiB")
    for part, gib in memory["activation_parts_gib"].items():
        lines.append(f"    {'activations/' + part:<28} {gib:>8.3f} GiB")
    lines += [f"note: {note}" for note in memory["notes"]]
    lines.append(f"method: {plan['method']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Entry point of ``insightedit plan``."""
    parser = argparse.ArgumentParser(prog="insightedit plan", description=__doc__.splitlines()[0])
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
    args = parser.parse_args(argv)
    if not args.config and not args.member:
        raise UserError("plan needs --config <yaml> or --member <name>")
    if args.edit:
        from insightedit.planning.edit_memory import format_edit_plan, plan_edit_memory

        system, _, _ = build_on_meta(planned_config(args.config, args.member).get("model") or {})
        rows = plan_edit_memory(system, args.resolution)
        as_json = json.dumps([row.as_dict() for row in rows], indent=2)
        print(as_json if args.json else format_edit_plan(rows, args.resolution))
        return 0
    plan = make_plan(args.config, args.devices, args.member)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
