"""Real-format model folders with random weights, every width as in the real models, depth cut by config.

Writes, with nothing from the network (``python benchmarks/full_width_folders.py --out DIR``, default
``checkpoints/full_width_cpu``, the folder ``lightning_configs/full_width_cpu.yaml`` names):

- ``llava-1.5-7b-hf/``: ``llava-hf/llava-1.5-7b-hf``'s layout: ``config.json`` (4096-wide Llama, vocabulary
  32064; CLIP ViT-L/14-336 vision tower 1024 wide), ``generation_config.json``, sharded safetensors with
  ``model.safetensors.index.json`` (float16, as the real repo), ``preprocessor_config.json``,
  ``processor_config.json``, the chat template and the tokenizer files. The real tokenizer is a
  SentencePiece model that cannot be downloaded here: a Llama-style BPE (``tokenizers``, Metaspace, byte
  fallback) of exactly 32000 pieces stands in, with the real special tokens and ids (``<unk>`` 0, ``<s>`` 1,
  ``</s>`` 2, ``<image>`` 32000, ``<pad>`` 32001); there is no ``tokenizer.model``.
- ``instruct-pix2pix/``: ``timbrooks/instruct-pix2pix``'s diffusers layout (``model_index.json``,
  ``scheduler/``, ``text_encoder/``, ``tokenizer/``, ``unet/``, ``vae/``, ``feature_extractor/``): SD1.5's
  UNet with 8 input channels (320/640/1280/1280, cross-attention 768), CLIP-L's text encoder (768 wide), the
  VAE at its real widths, a CLIP tokenizer with 49408 entries and ``<|startoftext|>`` 49406 /
  ``<|endoftext|>`` 49407 (byte-level BPE with generated merges; the real merge table is not here). The
  real repo's ``safety_checker/`` is left out (``model_index.json`` says ``null``).
- ``clip-vit-large-patch14-openai/``: the layout of open_clip's ``timm/vit_large_patch14_clip_224.openai``
  (``open_clip_config.json`` + ``open_clip_model.safetensors``): ViT-L/14 (1024 wide, 768-d embedding,
  QuickGELU) with fewer layers. The overlay names the safetensors file as ``bridging.clip_pretrained`` and
  the same model config as ``bridging.clip_model``.

Depths (:data:`FULL_DEPTHS`): 2 decoder layers, 3 vision layers (``vision_feature_layer: -2`` stays valid),
UNet and VAE ``layers_per_block: 1``, 2 text-encoder layers, 2 IAA CLIP layers. A folder is written once
and reused while its ``.full_width_version`` stamp matches (:data:`VERSION`); ``small=True`` writes the same
layouts at small widths (for the fast tests) into a separate stamp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import string
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VERSION = "1"
STAMP = ".full_width_version"
DEFAULT_OUT = Path("checkpoints/full_width_cpu")
LLAVA_DIR = "llava-1.5-7b-hf"
PIX2PIX_DIR = "instruct-pix2pix"
CLIP_DIR = "clip-vit-large-patch14-openai"
CLIP_FILE = "open_clip_model.safetensors"
LLAMA_VOCAB = 32000  # Llama-2's SentencePiece pieces; <image> and <pad> follow
CLIP_VOCAB = 49408  # CLIP's BPE: 512 byte symbols, 48894 merges, <|startoftext|>, <|endoftext|>
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Depths:
    """The depths cut by config (every width stays the real one unless ``small``)."""

    llm_layers: int = 2
    vision_layers: int = 3
    unet_layers_per_block: int = 1
    vae_layers_per_block: int = 1
    text_layers: int = 2
    clip_layers: int = 2


FULL_DEPTHS = Depths()


def iaa_clip_config(depths: Depths = FULL_DEPTHS, small: bool = False) -> dict[str, Any]:
    """open_clip's ``ViT-L-14`` model config with ``depths.clip_layers`` vision layers and one text layer."""
    if small:
        return {
            "embed_dim": 768,
            "vision_cfg": {
                "image_size": 28,
                "layers": depths.clip_layers,
                "width": 64,
                "head_width": 32,
                "patch_size": 14,
            },
            "text_cfg": {"context_length": 77, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
            "quick_gelu": True,
        }
    return {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": depths.clip_layers, "width": 1024, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 1},
        "quick_gelu": True,
    }


def llava_config(depths: Depths = FULL_DEPTHS, small: bool = False) -> Any:
    """llava-1.5-7b-hf's config with the depths cut (``small``: narrow towers, the real vocabulary)."""
    from insightedit.models.comprehension.presets import FULL_TEXT_CONFIG, FULL_VISION_CONFIG, llava_config

    vision = {**FULL_VISION_CONFIG, "num_hidden_layers": depths.vision_layers}
    text = {**FULL_TEXT_CONFIG, "num_hidden_layers": depths.llm_layers, "bos_token_id": 1, "eos_token_id": 2}
    if small:
        vision |= {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
        text |= {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}
    config = llava_config(vision, text, image_token_id=LLAMA_VOCAB, pad_token_id=LLAMA_VOCAB + 1)
    config.dtype = "float16"  # the real repo's weights
    return config


def unet_config(depths: Depths = FULL_DEPTHS, small: bool = False) -> dict[str, Any]:
    """SD1.5's UNet with InstructPix2Pix's 8 input channels, ``layers_per_block`` cut."""
    from insightedit.models.generation.presets import FULL_UNET_CONFIG

    config = {**FULL_UNET_CONFIG, "layers_per_block": depths.unet_layers_per_block}
    if small:
        config |= {"block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8, "cross_attention_dim": 32}
    return config


def vae_config(depths: Depths = FULL_DEPTHS, small: bool = False) -> dict[str, Any]:
    """SD1.5's VAE with ``layers_per_block`` cut."""
    from insightedit.models.generation.presets import FULL_VAE_CONFIG

    config = {**FULL_VAE_CONFIG, "layers_per_block": depths.vae_layers_per_block}
    if small:
        config |= {"block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4}
    return config


def text_encoder_config(depths: Depths = FULL_DEPTHS, small: bool = False) -> dict[str, Any]:
    """CLIP-L's text encoder (SD1.5's) with ``depths.text_layers`` layers; token ids as in the real config."""
    from insightedit.models.generation.presets import FULL_TEXT_CONFIG

    config = {**FULL_TEXT_CONFIG, "num_hidden_layers": depths.text_layers}
    config |= {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # runwayml's config.json says so
    if small:
        config |= {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32}
    return config


# ---------------------------------------------------------------- tokenizers


def llama_tokenizer() -> Any:
    """A Llama-style fast tokenizer with 32000 pieces, ``<image>`` 32000 and ``<pad>`` 32001 (llava-hf's ids)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizerFast

    from insightedit.models.comprehension.prompts import IMAGE_TOKEN, LLAVA_15_CHAT_TEMPLATE
    from insightedit.models.comprehension.tiny_tokenizer import tiny_corpus

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_VOCAB,
        special_tokens=specials,
        initial_alphabet=sorted(set(string.ascii_letters + string.digits + string.punctuation + "▁")),
        show_progress=False,
    )
    bpe = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.train_from_iterator(tiny_corpus(), trainer=trainer)
    vocab: dict[str, int] = bpe.get_vocab()
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    pieces = sorted((token for token in vocab if not token.startswith("<")), key=vocab.__getitem__)
    for left in pieces:  # fill to 32000 with merges of learnt pieces (the real table is not here)
        for right in pieces:
            if len(vocab) >= LLAMA_VOCAB:
                break
            if left + right not in vocab and not right.startswith("▁"):
                vocab[left + right] = len(vocab)
                merges.append((left, right))
        if len(vocab) >= LLAMA_VOCAB:
            break
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left",
        model_max_length=4096, add_bos_token=True, add_eos_token=False,
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.chat_template = LLAVA_15_CHAT_TEMPLATE
    return tokenizer


def _byte_alphabet() -> list[str]:
    from insightedit.models.text_encoder import _byte_alphabet as alphabet

    return alphabet()


def write_clip_tokenizer(directory: Path) -> None:
    """SD1.5's tokenizer files (``vocab.json``, ``merges.txt``, configs): 49408 entries, the real special ids."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    vocab = {token: index for index, token in enumerate(tokens)}
    first = string.ascii_lowercase + string.digits
    letters = list(first) + [c for c in alphabet if c not in first]
    merges: list[str] = []
    for left in letters:  # letter pairs first, word ends before word middles
        for right in letters:
            for end in ("</w>", ""):
                if len(vocab) >= CLIP_VOCAB - 2:
                    break
                if left + right + end not in vocab:
                    vocab[left + right + end] = len(vocab)
                    merges.append(f"{left} {right}{end}")
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}  # fmt: skip
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def clip_image_processor(size: int) -> Any:
    """CLIP's image preprocessing at ``size`` px (shortest edge, centre crop, OpenAI mean/std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
        resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )  # fmt: skip


# ---------------------------------------------------------------- the three folders


def write_llava(directory: Path, depths: Depths = FULL_DEPTHS, small: bool = False) -> None:
    """llava-hf/llava-1.5-7b-hf's layout with random weights (float16, sharded with an index)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = llama_tokenizer()
    config = llava_config(depths, small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).to(torch.float16)
    model.generation_config.pad_token_id = LLAMA_VOCAB + 1
    model.save_pretrained(str(directory), max_shard_size="1GB" if not small else "2MB")
    processor = LlavaProcessor(
        image_processor=clip_image_processor(config.vision_config.image_size),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(str(directory))
    processor.image_processor.save_pretrained(str(directory))  # preprocessor_config.json, as the real repo


def write_instruct_pix2pix(directory: Path, depths: Depths = FULL_DEPTHS, small: bool = False) -> None:
    """timbrooks/instruct-pix2pix's diffusers layout with random weights (no safety checker)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from insightedit.models.generation.presets import STABLE_DIFFUSION_SCHEDULER

    with tempfile.TemporaryDirectory() as scratch:
        write_clip_tokenizer(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = UNet2DConditionModel(**unet_config(depths, small))
        vae = AutoencoderKL(**vae_config(depths, small))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(depths, small)))
    scheduler = EulerAncestralDiscreteScheduler(**STABLE_DIFFUSION_SCHEDULER, steps_offset=1)
    pipeline = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=clip_image_processor(224), requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    write_clip_tokenizer(directory / "tokenizer")  # the real repo's four tokenizer files, as written above


def write_iaa_clip(directory: Path, depths: Depths = FULL_DEPTHS, small: bool = False) -> None:
    """open_clip's hub layout for ViT-L-14 + OpenAI (``open_clip_config.json``, ``open_clip_model.safetensors``)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config = iaa_clip_config(depths, small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        clip = open_clip.CLIP(**config)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(directory / CLIP_FILE))
    size = config["vision_cfg"]["image_size"]
    preprocess = {"image_size": size, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
                  "resize_mode": "shortest"}  # fmt: skip
    text = {"model_cfg": config, "preprocess_cfg": preprocess}
    (directory / "open_clip_config.json").write_text(json.dumps(text, indent=2))


WRITERS: dict[str, Callable[[Path, Depths, bool], None]] = {
    LLAVA_DIR: write_llava,
    PIX2PIX_DIR: write_instruct_pix2pix,
    CLIP_DIR: write_iaa_clip,
}


def _stamp(depths: Depths, small: bool) -> str:
    return json.dumps({"version": VERSION, "small": small, "depths": asdict(depths)}, sort_keys=True)


def write_full_width_folders(
    out: str | Path = DEFAULT_OUT, depths: Depths = FULL_DEPTHS, small: bool = False, force: bool = False
) -> dict[str, Path]:
    """Write the three folders under ``out`` (each once: reused while its version stamp matches); return them.

    Each is written to a hidden staging folder and renamed into place, so an interrupted run leaves no
    half folder that looks finished. ``small``: the same files at small widths (tests).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(depths, small)
    written: dict[str, Path] = {}
    for name, writer in WRITERS.items():
        target = out / name
        written[name] = target
        if not force and (target / STAMP).is_file() and (target / STAMP).read_text() == stamp:
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
        try:
            writer(staging, depths, small)
            (staging / STAMP).write_text(stamp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/full_width_folders.py [--out DIR] [--force]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rewrite even when the version stamp matches")
    parser.add_argument("--small", action="store_true", help="the same layouts at small widths (tests)")
    args = parser.parse_args(argv)
    folders = write_full_width_folders(args.out, small=args.small, force=args.force)
    for name, path in folders.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{name}: {path} ({size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
