"""Named presets for the generation components: the ``tiny`` twin and the ``full`` InstructPix2Pix model.

Component builders take every size as an argument; the presets only choose the sizes. ``full`` loads
real weights with ``from_pretrained`` when given a hub id or a local diffusers folder (for example
``timbrooks/instruct-pix2pix``) and otherwise builds the same architecture on the ``meta`` device, with
no memory and no download, for parameter counts and memory plans.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from insightedit.hub_weights import DIFFUSERS_FILE, require_hub_weights
from insightedit.models.generation.edit_unet import EDIT_UNET_CONFIG, EditUNet
from insightedit.models.generation.latent_space import LatentSpace, PixelUnshuffleLatentSpace, VaeLatentSpace
from insightedit.models.loads import report_loaded
from insightedit.models.text_encoder import FrozenTextEncoder, tiny_clip_text_config, tiny_clip_tokenizer
from insightedit.training.safe_load import load_checkpoint

PRESETS = ("tiny", "full")
TINY_SEED = 20250611

# Stable Diffusion 1.5's UNet with InstructPix2Pix's 8 input channels (859,532,484 parameters).
FULL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
FULL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
FULL_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# The tiny twin: a 48-channel exact latent (pixel-unshuffle x4) so attention runs only on a coarse grid.
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 96,
    "out_channels": 48,
    "block_out_channels": (64, 128),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
STABLE_DIFFUSION_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def cache_dir() -> Path:
    """Where locally built assets (the tiny tokenizer) live: ``$INSIGHTEDIT_CACHE`` or ``~/.cache/insightedit``."""
    return Path(os.environ.get("INSIGHTEDIT_CACHE", Path.home() / ".cache" / "insightedit"))


@dataclass
class GenerationComponents:
    """What a generation module is built from."""

    unet: EditUNet
    latent_space: LatentSpace
    noise_scheduler: DDPMScheduler
    text_encoder: FrozenTextEncoder | None


def _subfolder(source: str, name: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for component ``name`` of a pipeline folder or hub id."""
    local = Path(source)
    if local.is_dir() and not (local / name).is_dir():
        return {"pretrained_model_name_or_path": str(local)}
    return {"pretrained_model_name_or_path": source, "subfolder": name}


# where Lightning checkpoints keep the diffusers UNet: an EditorSystem (any member), a GenerationModule,
# and a GenerationModule written before the generator moved into ``model``
UNET_PREFIXES = ("editor.generation.unet.unet.", "model.unet.unet.", "unet.unet.")


def load_unet_from_checkpoint(unet: UNet2DConditionModel, path: Path) -> None:
    """Load the UNet of a Lightning checkpoint into ``unet``, every key.

    The checkpoint is an ``EditorSystem``'s (``editor.generation.unet.unet.*``, e.g. the tiny
    InstructPix2Pix member trained with its ``tiny/instruct_pix2pix.yaml``) or a ``GenerationModule``'s
    (``model.unet.unet.*``, or ``unet.unet.*`` from before the zoo). This is how a tiny twin starts from
    its own InstructPix2Pix stand-in, as the full system starts from ``timbrooks/instruct-pix2pix``. An
    image branch in the checkpoint is left out (the members that have one initialise it from the UNet's
    ``to_k``/``to_v``).
    """
    if not path.is_file():
        raise FileNotFoundError(f"generation.pretrained: checkpoint {path} not found")
    checkpoint = load_checkpoint(path, "generation.pretrained")  # weights only: a file naming code is refused
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    weights: dict[str, Any] = {}
    for prefix in UNET_PREFIXES:  # the first prefix the checkpoint uses
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            break
    if not weights:
        raise ValueError(f"generation.pretrained: {path} holds no UNet weights ({', '.join(UNET_PREFIXES)}*)")
    image_branch = [k for k in weights if ".processor." in k]  # the image branch's to_k_ip/to_v_ip
    weights = {k: v for k, v in weights.items() if ".processor." not in k}
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"generation.pretrained: {path} does not fit this UNet config "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    left_out = f"{len(image_branch)} image-branch tensors left out" if image_branch else ""
    report_loaded("generation.pretrained", len(weights), path, f"the UNet; {left_out}" if left_out else "the UNet")


def build_generation_components(
    preset: str = "tiny",
    pretrained: str | None = None,
    image_embed_dim: int | None = None,
    num_image_tokens: int = 4,
    image_scale: float = 1.0,
    unet_config: dict[str, Any] | None = None,
    latent: str = "auto",
    with_text_encoder: bool = True,
    device: str | torch.device | None = None,
) -> GenerationComponents:
    """Build the UNet, latent space, DDPM schedule and text encoder of ``preset``.

    Args:
        preset: ``"tiny"`` or ``"full"``.
        pretrained: a hub id or local diffusers pipeline folder to load weights from (``full``), a
            folder written by ``save_pretrained`` (either preset), or a Lightning checkpoint (``.ckpt``) of a
            text-conditioned ``GenerationModule`` whose UNet fits ``unet_config``. ``None`` builds from the config.
        image_embed_dim: width of the IAA embedding projected to ``f_img``; ``None`` means 768 for
            ``full``, 32 for ``tiny``; ``0`` builds no image branch (plain InstructPix2Pix).
        unet_config: overrides of the preset's UNet config (tiny twins of other sizes).
        latent: ``"auto"`` (the preset's), ``"vae"`` or ``"pixel_unshuffle"``.
        device: ``"meta"`` builds without memory (the default for ``full`` without weights).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    if image_embed_dim is None:
        image_embed_dim = 768 if preset == "full" else 32
    if preset == "full" and pretrained is None and device is None:
        device = "meta"
    context = torch.device(device) if device is not None else torch.device("cpu")
    # the tiny twin's frozen parts (text encoder, VAE) are a fixed "base model": same seed, same weights,
    # so a checkpoint that stores only trained weights restores the whole model
    with context, torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        if pretrained is not None and (Path(pretrained) / EDIT_UNET_CONFIG).is_file():
            # a folder we wrote: the UNet comes with its image branch, whatever the arguments say
            edit_unet = EditUNet.from_pretrained(pretrained)
            scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
            count = len(edit_unet.state_dict())
            report_loaded("generation.pretrained", count, pretrained, "the UNet and its image branch")
        else:
            from_checkpoint = pretrained is not None and Path(pretrained).suffix == ".ckpt"
            if pretrained is not None and not from_checkpoint:
                require_hub_weights("generation.pretrained", pretrained, DIFFUSERS_FILE)  # one line, not retries
                unet = UNet2DConditionModel.from_pretrained(**_subfolder(pretrained, "unet"))
                scheduler = DDPMScheduler.from_pretrained(**_subfolder(pretrained, "scheduler"))
                report_loaded("generation.pretrained", len(unet.state_dict()), pretrained, "the UNet")
            else:
                config = dict(FULL_UNET_CONFIG if preset == "full" else TINY_UNET_CONFIG)
                config.update(unet_config or {})
                unet = UNet2DConditionModel(**config)
                scheduler = DDPMScheduler(**STABLE_DIFFUSION_SCHEDULER)
                if from_checkpoint:  # before the image branch copies to_k / to_v
                    load_unet_from_checkpoint(unet, Path(str(pretrained)))
            edit_unet = EditUNet(
                unet,
                image_embed_dim=image_embed_dim or None,
                num_image_tokens=num_image_tokens,
                image_scale=image_scale,
            )
        folder = None if pretrained is None or Path(pretrained).suffix == ".ckpt" else pretrained
        latent_space = _build_latent_space(preset, folder, latent, edit_unet.unet)
        text_encoder = _build_text_encoder(preset, folder) if with_text_encoder else None
    return GenerationComponents(edit_unet, latent_space, scheduler, text_encoder)


def _build_latent_space(preset: str, pretrained: str | None, latent: str, unet: UNet2DConditionModel) -> LatentSpace:
    if latent == "auto":
        latent = "vae" if preset == "full" else "pixel_unshuffle"
    if latent == "pixel_unshuffle":
        factor = int(round((unet.config.out_channels / 3) ** 0.5))
        if 3 * factor * factor != unet.config.out_channels:
            raise ValueError(f"a pixel-unshuffle space needs 3·f² UNet channels, got {unet.config.out_channels}")
        return PixelUnshuffleLatentSpace(factor)
    if latent != "vae":
        raise ValueError(f"unknown latent space {latent!r}; choose auto, vae or pixel_unshuffle")
    if pretrained is not None:
        vae = AutoencoderKL.from_pretrained(**_subfolder(pretrained, "vae"))
    elif preset == "full":
        vae = AutoencoderKL(**FULL_VAE_CONFIG)
    else:
        vae = AutoencoderKL(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=int(unet.config.out_channels),
            norm_num_groups=8,
            sample_size=32,
        )
    return VaeLatentSpace(vae)


def _build_text_encoder(preset: str, pretrained: str | None) -> FrozenTextEncoder:
    model: nn.Module
    tokenizer: CLIPTokenizer | None
    if pretrained is not None:
        model = CLIPTextModel.from_pretrained(**_subfolder(pretrained, "text_encoder"))
        tokenizer = CLIPTokenizer.from_pretrained(**_subfolder(pretrained, "tokenizer"))
    elif preset == "full":
        model = CLIPTextModel(CLIPTextConfig(**FULL_TEXT_CONFIG))
        tokenizer = None  # SD1.5's vocabulary is not shipped; the meta build only needs the shapes
    else:
        model = CLIPTextModel(tiny_clip_text_config())
        tokenizer = tiny_clip_tokenizer(cache_dir() / "tiny-clip-tokenizer")
    return FrozenTextEncoder(model, tokenizer)
