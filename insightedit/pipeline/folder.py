"""The exported model folder: what ``insightedit export`` writes and :class:`InsightEditPipeline` reads.

Layout (every weight file is safetensors; every config is JSON)::

    model_index.json            what the folder is, the base it needs, the default resolution
    comprehension/
        base/                   the frozen LLaVA (transformers format) - included, or referenced by hub id
        tokenizer/              LLaVA's tokenizer with the r [MM] tokens
        adapter/                the LoRA adapter (peft format) and the [MM] rows (mm_embeddings.safetensors)
    bridging/
        config.json             every size, the number of queries, whether the BIM runs
        model.safetensors       Q-Former, BIM and IAA Mapper (the CLIP that supervised the Mapper is not needed)
    generation/                 GenerationModule.save_pretrained: unet/ (diffusers), ip_adapter.safetensors,
                                scheduler/, vae/, text_encoder/, tokenizer/, generation_config.json

The LLaVA base is the only part that may be *referenced* instead of included: 13.5 GB of frozen weights
identical for every fine-tune of ``llava-hf/llava-1.5-7b-hf``. A tiny model always includes it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlavaForConditionalGeneration
from transformers.utils import logging as transformers_logging

from insightedit import __version__
from insightedit.errors import UserError
from insightedit.models.bridging.model import BridgingModel
from insightedit.models.bridging.presets import BridgingSizes, build_bridging_from_sizes
from insightedit.models.comprehension.model import ADAPTER_CONFIG_FILE, MM_ROWS_FILE, ComprehensionModel
from insightedit.models.comprehension.presets import quantization_config
from insightedit.models.generation.edit_unet import EDIT_UNET_CONFIG, IMAGE_BRANCH_WEIGHTS
from insightedit.systems.generation import GenerationModule

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "InsightEditPipeline"
FORMAT_VERSION = 1
BRIDGE_PARTS = ("qformer", "bim", "mapper")


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No transformers/diffusers progress bars while a folder is read or written (the CLI prints one line)."""
    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()
            diffusers_logging.enable_progress_bar()


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
    config = copy.deepcopy(model.base_model.config)
    with torch.device("meta"):
        plain = LlavaForConditionalGeneration(config)
    plain.load_state_dict(base_llava_state_dict(model), strict=True, assign=True)
    plain.save_pretrained(str(directory))


def save_comprehension(model: ComprehensionModel, directory: Path, base: str | None) -> dict[str, Any]:
    """Write tokenizer, adapter and [MM] rows (and the base when ``base`` is None); return its config."""
    if model.tokenizer is None:
        raise UserError("the comprehension model has no tokenizer (a meta-device build); load real weights")
    model.tokenizer.save_pretrained(str(directory / "tokenizer"))
    model.save_trainable(directory / "adapter")
    if base is None:
        save_llava_base(model, directory / "base")
    return {
        "base": "comprehension/base" if base is None else base,
        "base_included": base is None,
        "num_mm_tokens": model.num_mm_tokens,
    }


def load_comprehension(
    folder: Path,
    config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None = None,
) -> ComprehensionModel:
    """Build the comprehension model from the folder (base + tokenizer + adapter), for inference."""
    base = str(folder / config["base"]) if config.get("base_included") else str(config["base"])
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
        kwargs["device_map"] = {"": str(device)}
    llava = LlavaForConditionalGeneration.from_pretrained(base, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "comprehension" / "tokenizer"))
    adapter = folder / "comprehension" / "adapter"
    lora = LoraConfig.from_pretrained(str(adapter)) if (adapter / ADAPTER_CONFIG_FILE).is_file() else None
    model = ComprehensionModel(llava, tokenizer, num_mm_tokens=int(config["num_mm_tokens"]), lora=lora)
    model.load_trainable(adapter)
    if quantization is None:
        model.to(device=device, dtype=dtype)
    return model.requires_grad_(False).eval()


# ------------------------------------------------------------------------------------------ bridging
def save_bridging(model: BridgingModel, sizes: BridgingSizes, num_queries: int, directory: Path) -> dict[str, Any]:
    """Write the bridge's sizes and its Q-Former, BIM and Mapper weights; return its config."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"sizes": asdict(sizes), "num_queries": num_queries, "use_bim": bool(model.use_bim)}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {
        f"{part}.{key}": value.detach().cpu().contiguous().clone()
        for part in BRIDGE_PARTS
        for key, value in getattr(model, part).state_dict().items()
    }
    save_file(state, str(directory / "model.safetensors"))
    return {"folder": "bridging"}


def read_bridge_config(folder: Path) -> dict[str, Any]:
    """``bridging/config.json``: sizes, number of queries, whether the BIM runs."""
    return dict(json.loads((folder / "bridging" / "config.json").read_text()))


def load_bridging(folder: Path, device: torch.device, dtype: torch.dtype) -> BridgingModel:
    """Build the bridge from ``bridging/config.json`` and load its weights (strict: every key must match)."""
    config = read_bridge_config(folder)
    sizes = BridgingSizes(**config["sizes"])
    with torch.device("meta"):
        model = build_bridging_from_sizes(
            sizes, num_queries=int(config["num_queries"]), use_bim=bool(config["use_bim"]), with_clip=False
        )
    model.load_state_dict(load_file(str(folder / "bridging" / "model.safetensors")), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------- the folder
def write_model_index(directory: Path, preset: str, resolution: int | None, parts: dict[str, Any]) -> None:
    """Write ``model_index.json``: the pipeline class, format version, preset, default resolution, parts."""
    index = {
        "_class_name": PIPELINE_CLASS,
        "_insightedit_version": __version__,
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "resolution": resolution,
        **parts,
    }
    (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2, default=str) + "\n")


def read_model_index(directory: str | Path) -> dict[str, Any]:
    """Read and check ``model_index.json`` and every file it implies; raise :class:`UserError` if one is bad."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"model folder {directory} not found")
    path = directory / MODEL_INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory} is not an exported InsightEdit model (no {MODEL_INDEX})") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable ({error})") from None
    if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS:
        raise UserError(f"{path} does not describe an {PIPELINE_CLASS}")
    if index.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {index.get('format_version')}, this code reads {FORMAT_VERSION}")
    check_model_files(directory, index)
    return index


def _read_json(path: Path) -> Any:
    """A JSON file of the folder; a missing, unreadable or invalid one is a :class:`UserError` naming it."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the model folder is incomplete; export it again")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); export the model again") from None


def _model_files(directory: Path, weights: str) -> list[Path]:
    """A transformers/diffusers model folder's ``config.json`` and ``weights`` (or the shards its index lists)."""
    sharded = directory / f"{weights}.index.json"
    if (directory / weights).is_file() or not sharded.is_file():
        return [directory / "config.json", directory / weights]
    index = _read_json(sharded)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{sharded} lists no weight files; export the model again")
    return [directory / "config.json", *(directory / shard for shard in sorted(set(map(str, weight_map.values()))))]


def required_files(directory: Path, index: dict[str, Any]) -> list[Path]:
    """Every config and weight file that loading the folder of ``index`` needs (the layout above)."""
    comprehension = index.get("comprehension") or {}
    generation = directory / "generation"
    adapter = directory / "comprehension" / "adapter"
    files = [directory / "comprehension" / "tokenizer" / "tokenizer_config.json", adapter / MM_ROWS_FILE]
    if comprehension.get("base_included"):
        base = directory / str(comprehension.get("base", "comprehension/base"))
        files += _model_files(base, "model.safetensors")
    if (adapter / ADAPTER_CONFIG_FILE).is_file() or (adapter / "adapter_model.safetensors").is_file():
        files += [adapter / ADAPTER_CONFIG_FILE, adapter / "adapter_model.safetensors"]  # LoRA: both or neither
    files += [directory / "bridging" / "config.json", directory / "bridging" / "model.safetensors"]
    settings = _read_json(generation / "generation_config.json")
    unet_config = _read_json(generation / EDIT_UNET_CONFIG)
    files += [generation / "scheduler" / "scheduler_config.json"]
    files += _model_files(generation / "unet", "diffusion_pytorch_model.safetensors")
    if isinstance(unet_config, dict) and unet_config.get("image_embed_dim") is not None:
        files.append(generation / IMAGE_BRANCH_WEIGHTS)
    hparams = settings.get("hparams", {}) if isinstance(settings, dict) else {}
    if isinstance(hparams, dict) and hparams.get("with_text_encoder", True):
        files += _model_files(generation / "text_encoder", "model.safetensors")
    latent = settings.get("latent", {}) if isinstance(settings, dict) else {}
    if isinstance(latent, dict) and latent.get("kind") == "vae":
        files += _model_files(generation / "vae", "diffusion_pytorch_model.safetensors")
    return files


def check_model_files(directory: str | Path, index: dict[str, Any]) -> None:
    """Raise :class:`UserError` naming a needed file that is missing or any JSON/safetensors file that is damaged.

    Runs before any weight is loaded; a safetensors header is checked against the file's length, so a
    truncated file is caught here (a corrupt byte inside a tensor's data is not detectable without a checksum).
    """
    directory = Path(directory)
    for path in required_files(directory, index):
        if not path.is_file():
            raise UserError(f"{path} is missing: the model folder is incomplete; export it again")
    for path in sorted(directory.rglob("*.json")):
        _read_json(path)
    for path in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path} is damaged (truncated or corrupt: {first}); export the model again") from None


def load_generation(folder: Path, device: torch.device, dtype: torch.dtype) -> GenerationModule:
    """The generation module from ``generation/`` (UNet, image branch, scheduler, VAE, null text)."""
    module = GenerationModule.from_pretrained(folder / "generation").requires_grad_(False).eval()
    module.unet.to(device=device, dtype=dtype)
    if isinstance(module.latent_space, torch.nn.Module):
        module.latent_space.to(device=device, dtype=dtype)
    module.null_f_txt = module.null_f_txt.to(device=device, dtype=dtype)
    return module
