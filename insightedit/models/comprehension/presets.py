"""Named presets for the comprehension model: ``full`` (LLaVA-1.5-7B) and its ``tiny`` CPU twin.

``full`` is ``llava-hf/llava-1.5-7b-hf``'s architecture (CLIP ViT-L/14-336 + a Llama-2-7B-shaped LLM,
7,063,427,072 parameters): with ``pretrained`` (hub id or local folder) :func:`build_comprehension`
builds it on the ``meta`` device from its config and ``ComprehensionModel.load_pretrained`` reads the
weights (:func:`build_llava` with ``from_pretrained``); without, it stays on ``meta`` (no memory, no
download) for parameter counts and memory plans. Only a quantized model is read while it is built.
``tiny`` is a 2-layer CLIP vision tower + 2-layer Llama built from a config
with a fixed seed, and a tokenizer trained offline; both are saved together in
``cache_dir()/tiny-llava-<version>`` so the quantized path can load them with ``from_pretrained``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from transformers import (
    AutoTokenizer,
    BitsAndBytesConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from insightedit.hub_weights import LLAVA_FILE, require_hub_weights
from insightedit.models.comprehension.model import ComprehensionModel
from insightedit.models.comprehension.prompts import IMAGE_TOKEN
from insightedit.models.comprehension.tiny_tokenizer import train_tiny_tokenizer
from insightedit.models.generation.presets import cache_dir
from insightedit.models.loads import report_loaded

PRESETS = ("tiny", "full")
QUANTIZATIONS = ("4bit", "8bit")
FULL_PARAMETERS = 7_063_427_072  # llava-1.5-7b-hf before the [MM] rows
FULL_TOKENIZER_LENGTH = 32002  # llava-hf's tokenizer: Llama's 32000 + <image> + <pad>; [MM0] gets this id
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
# Quantize the LLM only: the vision tower feeds the bridge and the projector is small (QLoRA-LLaVA's choice).
QUANTIZATION_SKIP: list[str] = [r".*vision_tower", r".*multi_modal_projector", "lm_head"]
TINY_VERSION = "v1"  # bump when the tiny configs or tokenizer change, so stale caches are not reused
TINY_SEED = 0

FULL_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
FULL_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "pad_token_id": 32001,
}
TINY_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 4,
    "projection_dim": 64,
    "hidden_act": "quick_gelu",
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def llava_config(vision: dict[str, Any], text: dict[str, Any], image_token_id: int, **overrides: Any) -> LlavaConfig:
    """A LLaVA-1.5 config (MLP-GELU projector, features of layer -2 without CLS) from the two towers."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        **overrides,
    )


def full_llava_config() -> LlavaConfig:
    """``llava-hf/llava-1.5-7b-hf``'s config."""
    return llava_config(FULL_VISION_CONFIG, FULL_TEXT_CONFIG, image_token_id=32000, pad_token_id=32001)


def tiny_llava_config(tokenizer: PreTrainedTokenizerBase, image_size: int = 32) -> LlavaConfig:
    """The tiny twin's config, sized to ``tokenizer`` (image 32 px, 4 px patches: an 8x8 grid)."""
    pad_id = tokenizer.pad_token_id
    text = {**TINY_TEXT_CONFIG, "vocab_size": len(tokenizer), "pad_token_id": pad_id}
    text |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    vision = {**TINY_VISION_CONFIG, "image_size": image_size}
    image_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))  # type: ignore[arg-type]
    return llava_config(vision, text, image_token_id=image_id, pad_token_id=pad_id)


def build_tiny_llava(tokenizer: PreTrainedTokenizerBase, seed: int = TINY_SEED) -> LlavaForConditionalGeneration:
    """The tiny LLaVA, randomly initialised under ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(tiny_llava_config(tokenizer))


def write_tiny_llava(directory: str | Path) -> Path:
    """Save the tiny tokenizer and tiny LLaVA together to ``directory`` (atomically); return it."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    tokenizer = train_tiny_tokenizer()
    tokenizer.save_pretrained(str(staging))
    build_tiny_llava(tokenizer).save_pretrained(str(staging))
    try:
        os.replace(staging, directory)
    except OSError:  # another process wrote it first; its copy is identical
        for item in staging.iterdir():
            item.unlink()
        staging.rmdir()
    return directory


def tiny_llava_dir() -> Path:
    """The cached folder holding the tiny tokenizer and model, written on first use."""
    directory = cache_dir() / f"tiny-llava-{TINY_VERSION}"
    if not (directory / "config.json").is_file():
        write_tiny_llava(directory)
    return directory


def quantization_config(quantization: str, compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    """The bitsandbytes settings: ``"4bit"`` (NF4, double quantization; QLoRA) or ``"8bit"`` (LLM.int8)."""
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=QUANTIZATION_SKIP,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANTIZATION_SKIP)
    raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")


def lora_target_regex(modules: Sequence[str]) -> str:
    """A peft ``target_modules`` regex that matches ``modules`` inside the language model only."""
    names = "|".join(re.escape(name) for name in modules)
    return rf"^(?:.*\.)?language_model\.(?:.*\.)?(?:{names})$"


@dataclass
class LlavaBase:
    """A LLaVA model with its tokenizer, before the [MM] tokens and LoRA are added."""

    model: LlavaForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase | None
    first_mm_id: int | None = None


def build_llava(
    preset: str = "tiny",
    pretrained: str | None = None,
    quantization: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
) -> LlavaBase:
    """Load or build the preset's LLaVA and tokenizer (meta device for ``full`` with no weights)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    source = pretrained
    if source is None and preset == "tiny" and quantization is not None:
        source = str(tiny_llava_dir())  # bitsandbytes quantizes while loading, so load the saved twin
    if source is None and preset == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_llava_dir()))
        model = build_tiny_llava(tokenizer)
        model.to(device=device, dtype=torch_dtype)  # type: ignore[call-arg]  # (transformers wraps .to)
        return LlavaBase(model, tokenizer)
    if source is None:
        if quantization is not None:
            raise ValueError("a quantized full preset needs weights: pass pretrained (hub id or folder)")
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(full_llava_config())
        return LlavaBase(model, None, FULL_TOKENIZER_LENGTH)
    require_hub_weights("comprehension.pretrained", source, LLAVA_FILE)  # one line, not the hub's retries
    kwargs: dict[str, Any] = {"dtype": torch_dtype if torch_dtype is not None else "auto"}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, torch_dtype or torch.float32)
        kwargs["device_map"] = {"": device or "cpu"}
    model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
    report_loaded("comprehension.pretrained", len(model.state_dict()), source, "LLaVA")
    if quantization is None and device is not None:
        model.to(device)  # type: ignore[arg-type]
    return LlavaBase(model, AutoTokenizer.from_pretrained(source))


def build_comprehension(
    preset: str = "tiny",
    pretrained: str | None = None,
    num_mm_tokens: int = 32,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | None = None,
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> ComprehensionModel:
    """Build the comprehension model of ``preset``: LLaVA + r [MM] tokens + LoRA (rank 0: no LoRA).

    ``full`` without ``pretrained`` is built entirely on the ``meta`` device (counting and planning only).
    With ``pretrained`` the LLaVA is built on ``meta`` from its config (:func:`llava_architecture`) and the
    weights are read by ``model.load_pretrained()``; only a quantized model is read here (bitsandbytes
    quantizes while loading).
    ``dtype`` (e.g. ``"bfloat16"``) is the load dtype of ``pretrained`` weights and bitsandbytes' compute
    dtype; by default the checkpoint's own dtype (float32 on CPU for 4-bit compute).
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
    deferred = pretrained is not None and quantization is None  # bitsandbytes quantizes while it reads
    if deferred:
        base = llava_architecture(preset, str(pretrained))
    else:
        base = build_llava(preset, pretrained, quantization, dtype, device)
    lora = None
    if lora_rank > 0:
        lora = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=lora_target_regex(lora_target_modules or DEFAULT_LORA_TARGETS),
            bias="none",
        )
    on_meta = next(base.model.parameters()).is_meta
    with torch.device("meta") if on_meta else torch.device(next(base.model.parameters()).device):
        model = ComprehensionModel(
            base.model,
            base.tokenizer,
            num_mm_tokens=num_mm_tokens,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            quantized=quantization is not None,
            first_mm_id=base.first_mm_id,
        )
    if deferred:  # read by model.load_pretrained() (insightedit.models.loading.load_pretrained)
        model.pretrained = pretrained
        model.load_options = {"preset": preset, "dtype": dtype, "device": device}
    return model


def llava_architecture(preset: str, source: str) -> LlavaBase:
    """``source``'s LLaVA built on ``meta`` from its config, and its tokenizer, without reading a weight.

    The config and tokenizer are read from a local folder or the hub cache (never downloaded); a hub id
    not on this machine is built from the preset's config (``full``: llava-1.5-7b-hf's) and its tokenizer
    comes with the weights (:meth:`ComprehensionModel.load_pretrained`).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    try:
        config: LlavaConfig | None = LlavaConfig.from_pretrained(source, local_files_only=True)
    except Exception:  # noqa: BLE001 - not on this machine
        config = None
    try:
        tokenizer: PreTrainedTokenizerBase | None = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception:  # noqa: BLE001 - not on this machine: the load step reads it
        tokenizer = None
    if config is None:
        if preset == "full":
            config = full_llava_config()
        else:
            config = tiny_llava_config(AutoTokenizer.from_pretrained(str(tiny_llava_dir())))
    first_mm_id = None
    if tokenizer is None:  # [MM0] follows the tokenizer's last id (checked when the tokenizer is read)
        first_mm_id = FULL_TOKENIZER_LENGTH if preset == "full" else int(config.text_config.vocab_size)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return LlavaBase(model, tokenizer, first_mm_id)
