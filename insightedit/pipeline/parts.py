"""An editor's parts in the exported folder, saved and rebuilt by *kind*, whatever member they belong to.

Every part (:meth:`insightedit.models.editor.Editor.parts`) is one of four kinds, told apart by its class:

- ``comprehension`` (:class:`ComprehensionModel`): the frozen LLaVA (included, or referenced by hub id or
  folder), its tokenizer with the [MM] tokens, and the trained LoRA adapter and [MM] rows;
- ``bridging`` (:class:`BridgingModel`): ``config.json`` (every size, the number of queries, whether the
  BIM runs, which of BIM and Mapper exist) and ``model.safetensors`` (Q-Former, BIM, Mapper; the CLIP
  tower that supervised the Mapper is a training-only part and is left out);
- ``generation`` (:class:`EditGenerator`): :meth:`EditGenerator.save_pretrained`'s folder;
- ``module``: any other ``nn.Module`` (MGIE's edit head...): ``config.json`` naming its class and the
  keyword arguments that rebuild it (its ``get_config()``), and ``model.safetensors`` (its state dict).

A part is rebuilt from its folder alone; the member's :class:`Editor` is then assembled from the parts
(:meth:`Editor.from_parts`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from insightedit.errors import UserError
from insightedit.hub_weights import LLAVA_FILE, require_hub_weights
from insightedit.models.bridging.model import BridgingModel
from insightedit.models.bridging.presets import BridgingSizes, build_bridging_from_sizes
from insightedit.models.comprehension.model import ADAPTER_CONFIG_FILE, MM_ROWS_FILE, ComprehensionModel
from insightedit.models.comprehension.presets import quantization_config
from insightedit.models.generation.generator import GENERATION_CONFIG, EditGenerator

PART_KINDS = ("comprehension", "bridging", "generation", "module")
PART_CONFIG = "config.json"
PART_WEIGHTS = "model.safetensors"
MODULE_PACKAGE = "insightedit.models."  # a "module" part's class must live here (the folder is untrusted)
TRAINING_ONLY = ("clip_image_encoder.",)  # bridge submodules that only supervise training


def part_kind(part: nn.Module) -> str:
    """The kind a part is saved as (see the module docstring)."""
    if isinstance(part, ComprehensionModel):
        return "comprehension"
    if isinstance(part, BridgingModel):
        return "bridging"
    if isinstance(part, EditGenerator):
        return "generation"
    return "module"


def cpu_state(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``module``'s state dict as contiguous CPU tensors (what safetensors writes), without keys under ``skip``."""
    return {
        key: value.detach().cpu().contiguous().clone()
        for key, value in module.state_dict().items()
        if not key.startswith(skip)
    }


# ------------------------------------------------------------------------------------- comprehension
def base_llava_state_dict(model: ComprehensionModel) -> dict[str, torch.Tensor]:
    """The frozen LLaVA's own weights, without LoRA or [MM] rows, under transformers' names."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.base_model.state_dict().items():
        if "lora_" in key or key.endswith("new_rows"):
            continue
        key = key.replace(".base_layer.", ".").replace("embed_tokens.base.", "embed_tokens.")
        state[key.replace("lm_head.base.", "lm_head.")] = value
    return state


def save_llava_base(model: ComprehensionModel, directory: Path) -> None:
    """Write the frozen LLaVA exactly as it is in ``model`` (a plain transformers folder)."""
    import copy

    config = copy.deepcopy(model.base_model.config)
    with torch.device("meta"):
        plain = LlavaForConditionalGeneration(config)
    plain.load_state_dict(base_llava_state_dict(model), strict=True, assign=True)
    plain.save_pretrained(str(directory))


def save_comprehension(model: ComprehensionModel, root: Path, folder: str, base: str | None) -> dict[str, Any]:
    """Write tokenizer, adapter and [MM] rows (and the base when ``base`` is None); return the index entry."""
    if model.tokenizer is None:
        raise UserError("the comprehension model has no tokenizer (a meta-device build); load real weights")
    directory = root / folder
    model.tokenizer.save_pretrained(str(directory / "tokenizer"))
    model.save_trainable(directory / "adapter")
    if base is None:
        save_llava_base(model, directory / "base")
    return {
        "base": f"{folder}/base" if base is None else base,
        "base_included": base is None,
        "num_mm_tokens": model.num_mm_tokens,
    }


def load_comprehension(
    root: Path, entry: dict[str, Any], dtype: torch.dtype, quantization: str | None = None, device: str = "cpu"
) -> ComprehensionModel:
    """Build the comprehension model from its folder (base + tokenizer + adapter), for inference.

    On the CPU, or with ``quantization`` (``"4bit"``) where bitsandbytes puts it: on ``device``.
    """
    directory = root / entry["folder"]
    base = str(root / entry["base"]) if entry.get("base_included") else str(entry["base"])
    if not entry.get("base_included"):
        fix = "download it where there is network (hf download REPO) or export with --include-base; see checkpoints/"
        require_hub_weights(f"the LLaVA base in {root / 'model_index.json'}", base, LLAVA_FILE, fix=fix)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
        kwargs["device_map"] = {"": str(device)}
    llava = LlavaForConditionalGeneration.from_pretrained(base, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    adapter = directory / "adapter"
    lora = LoraConfig.from_pretrained(str(adapter)) if (adapter / ADAPTER_CONFIG_FILE).is_file() else None
    model = ComprehensionModel(llava, tokenizer, num_mm_tokens=int(entry["num_mm_tokens"]), lora=lora)
    model.load_trainable(adapter)
    if quantization is None:
        model.to(dtype=dtype)
    return model


# ------------------------------------------------------------------------------------------ bridging
def bridge_sizes(model: BridgingModel) -> tuple[BridgingSizes, int]:
    """The sizes that rebuild ``model`` and its number of queries, read from the built modules.

    Sizes of a part the bridge lacks (no BIM, no Mapper) are 0: nothing reads them.
    """
    qformer = model.qformer.config
    sizes: dict[str, Any] = {
        "d_llm": int(qformer.encoder_hidden_size),
        "text_dim": int(model.qformer.output_dim),
        "qformer_hidden": int(qformer.hidden_size),
        "qformer_layers": int(qformer.num_hidden_layers),
        "qformer_heads": int(qformer.num_attention_heads),
        "qformer_intermediate": int(qformer.intermediate_size),
        "qformer_dropout": float(qformer.hidden_dropout_prob),
        "d_vision": 0,
        "unet_in_width": 0,
        "bim_dim": 0,
        "bim_depth": 0,
        "bim_mlp_dim": 0,
        "bim_heads": 0,
        "bim_downsample": 0,
        "clip_dim": 0,
        "mapper_hidden": 0,
    }
    if model.bim is not None:
        bim = model.bim.config
        sizes.update(
            d_vision=int(model.bim.vision_in[0].in_features),
            unet_in_width=int(model.bim.visual_head.out_channels),
            bim_dim=int(bim.hidden_size),
            bim_depth=int(bim.num_hidden_layers),
            bim_mlp_dim=int(bim.mlp_dim),
            bim_heads=int(bim.num_attention_heads),
            bim_downsample=int(bim.attention_downsample_rate),
        )
    if model.mapper is not None:
        first, last = model.mapper.mlp[0], model.mapper.mlp[-1]
        sizes.update(mapper_hidden=int(first.out_features), clip_dim=int(last.out_features))
    return BridgingSizes(**sizes), int(model.qformer.num_queries)


def save_bridging(model: BridgingModel, root: Path, folder: str) -> dict[str, Any]:
    """Write the bridge's sizes and its Q-Former, BIM and Mapper weights; return the index entry."""
    directory = root / folder
    directory.mkdir(parents=True, exist_ok=True)
    sizes, num_queries = bridge_sizes(model)
    has = {"bim": model.bim is not None, "mapper": model.mapper is not None}
    config = {"sizes": asdict(sizes), "num_queries": num_queries, "use_bim": bool(model.use_bim), **has}
    (directory / PART_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(cpu_state(model, TRAINING_ONLY), str(directory / PART_WEIGHTS))
    return has


def load_bridging(root: Path, entry: dict[str, Any], dtype: torch.dtype) -> BridgingModel:
    """Build the bridge from its ``config.json`` and load its weights (strict: every key must match).

    Folders written before the zoo do not say which parts exist: they had all three.
    """
    directory = root / entry["folder"]
    config = json.loads((directory / PART_CONFIG).read_text())
    with torch.device("meta"):
        model = build_bridging_from_sizes(
            BridgingSizes(**config["sizes"]),
            num_queries=int(config["num_queries"]),
            use_bim=bool(config["use_bim"]),
            with_clip=False,
            with_bim=bool(config.get("bim", True)),
            with_mapper=bool(config.get("mapper", True)),
        )
    model.load_state_dict(load_file(str(directory / PART_WEIGHTS)), strict=True, assign=True)
    return model.to(dtype=dtype)


# ---------------------------------------------------------------------------------------- generation
def save_generation(model: EditGenerator, root: Path, folder: str) -> dict[str, Any]:
    """:meth:`EditGenerator.save_pretrained` into the part's folder."""
    model.save_pretrained(root / folder)
    return {}


def load_generation(root: Path, entry: dict[str, Any], dtype: torch.dtype) -> EditGenerator:
    """The generator from its folder (UNet, image branch, scheduler, latent space, text encoder, null text)."""
    return EditGenerator.from_pretrained(root / entry["folder"]).to(dtype=dtype)


# ------------------------------------------------------------------------------------- other modules
def module_class(reference: str) -> type[nn.Module]:
    """The class ``module:Class`` a ``module`` part names; only ``nn.Module`` classes of ``insightedit.models``.

    The folder is untrusted: a name outside the package, or anything but a module class, is refused
    before it is called.
    """
    module_name, _, class_name = str(reference).partition(":")
    if not module_name.startswith(MODULE_PACKAGE) or not class_name.isidentifier():
        raise UserError(f"a model part names the class {reference!r}; only insightedit.models classes are loaded")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise UserError(f"a model part names the class {reference!r}, which this insightedit lacks") from None
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise UserError(f"a model part names {reference!r}, which is not a module class")
    return cls


def save_module(model: nn.Module, root: Path, folder: str) -> dict[str, Any]:
    """Write a part of no known kind: its class, ``get_config()`` and its state dict; return the index entry."""
    get_config = getattr(model, "get_config", None)
    if get_config is None:
        raise TypeError(
            f"{type(model).__name__} cannot be exported: give it get_config() (the keyword arguments that rebuild it)"
        )
    reference = f"{type(model).__module__}:{type(model).__qualname__}"
    directory = root / folder
    directory.mkdir(parents=True, exist_ok=True)
    config = {"class": reference, "config": get_config()}
    (directory / PART_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(cpu_state(model), str(directory / PART_WEIGHTS))
    return {"class": reference}


def load_module(root: Path, entry: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """Rebuild a ``module`` part from its config (on ``meta``) and load its state dict (strict).

    A module whose build leaves tensors outside its state dict (non-persistent buffers) is built again
    on the CPU under a fixed seed, so nothing stays on ``meta``.
    """
    directory = root / entry["folder"]
    config = json.loads((directory / PART_CONFIG).read_text())
    cls = module_class(config.get("class", entry.get("class", "")))
    arguments = config.get("config") or {}
    state = load_file(str(directory / PART_WEIGHTS))
    with torch.device("meta"):
        model = cls(**arguments)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls(**arguments)
        model.load_state_dict(state, strict=True)
    return model.to(dtype=dtype)


# -------------------------------------------------------------------------------------- by kind
def save_part(kind: str, part: nn.Module, root: Path, folder: str, base: str | None) -> dict[str, Any]:
    """Write one part into ``root/folder``; return its index entry (``kind``, ``folder`` and what it adds)."""
    if kind == "comprehension":
        extra = save_comprehension(part, root, folder, base)  # type: ignore[arg-type]
    elif kind == "bridging":
        extra = save_bridging(part, root, folder)  # type: ignore[arg-type]
    elif kind == "generation":
        extra = save_generation(part, root, folder)  # type: ignore[arg-type]
    else:
        extra = save_module(part, root, folder)
    return {"kind": kind, "folder": folder, **extra}


def load_part(
    root: Path, entry: dict[str, Any], dtype: torch.dtype, quantization: str | None = None, device: str = "cpu"
) -> nn.Module:
    """Rebuild one part from its folder in ``dtype``, frozen and in eval mode, on the CPU.

    ``quantization`` (``"4bit"``) applies to a comprehension part, which bitsandbytes then loads on
    ``device``; the pipeline places everything else.
    """
    kind = entry["kind"]
    part: nn.Module
    if kind == "comprehension":
        part = load_comprehension(root, entry, dtype, quantization, device)
    elif kind == "bridging":
        part = load_bridging(root, entry, dtype)
    elif kind == "generation":
        part = load_generation(root, entry, dtype)
    else:
        part = load_module(root, entry, dtype)
    return part.requires_grad_(False).eval()


def _model_files(directory: Path, weights: str, read_json: Any) -> list[Path]:
    """A transformers/diffusers model folder's ``config.json`` and ``weights`` (or the shards its index lists)."""
    sharded = directory / f"{weights}.index.json"
    if (directory / weights).is_file() or not sharded.is_file():
        return [directory / "config.json", directory / weights]
    index = read_json(sharded)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{sharded} lists no weight files; export the model again")
    return [directory / "config.json", *(directory / shard for shard in sorted(set(map(str, weight_map.values()))))]


def part_files(root: Path, entry: dict[str, Any], read_json: Any) -> list[Path]:
    """Every config and weight file that loading the part of ``entry`` needs.

    ``read_json`` reads a JSON file of the folder (a missing or invalid one is the caller's one-line error).
    """
    from insightedit.models.generation.edit_unet import EDIT_UNET_CONFIG, IMAGE_BRANCH_WEIGHTS

    kind, directory = entry["kind"], root / entry["folder"]
    if kind == "comprehension":
        adapter = directory / "adapter"
        files = [directory / "tokenizer" / "tokenizer_config.json", adapter / MM_ROWS_FILE]
        if entry.get("base_included"):
            files += _model_files(root / str(entry.get("base")), "model.safetensors", read_json)
        if (adapter / ADAPTER_CONFIG_FILE).is_file() or (adapter / "adapter_model.safetensors").is_file():
            files += [adapter / ADAPTER_CONFIG_FILE, adapter / "adapter_model.safetensors"]  # LoRA: both or neither
        return files
    if kind != "generation":
        return [directory / PART_CONFIG, directory / PART_WEIGHTS]
    settings = read_json(directory / GENERATION_CONFIG)
    unet_config = read_json(directory / EDIT_UNET_CONFIG)
    files = [directory / "scheduler" / "scheduler_config.json"]
    files += _model_files(directory / "unet", "diffusion_pytorch_model.safetensors", read_json)
    if isinstance(unet_config, dict) and unet_config.get("image_embed_dim") is not None:
        files.append(directory / IMAGE_BRANCH_WEIGHTS)
    hparams = settings.get("hparams", {}) if isinstance(settings, dict) else {}
    if isinstance(hparams, dict) and hparams.get("with_text_encoder", True):
        files += _model_files(directory / "text_encoder", "model.safetensors", read_json)
    latent = settings.get("latent", {}) if isinstance(settings, dict) else {}
    if isinstance(latent, dict) and latent.get("kind") == "vae":
        files += _model_files(directory / "vae", "diffusion_pytorch_model.safetensors", read_json)
    return files


__all__ = [
    "PART_KINDS",
    "bridge_sizes",
    "load_part",
    "module_class",
    "part_files",
    "part_kind",
    "save_part",
]
