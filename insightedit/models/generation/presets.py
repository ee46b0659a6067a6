"""Named presets for the generation components: the ``tiny`` twin and the ``full`` InstructPix2Pix model.

Component builders take every size as an argument; the presets only choose the sizes. Building reads no
weights: with a hub id or a local diffusers folder (for example ``timbrooks/instruct-pix2pix``) the
architecture comes from its config files when they are on this machine (else from the preset), and
:func:`load_generation_weights` reads the weights afterwards (``EditGenerator.load_pretrained``). ``full``
without weights is built on the ``meta`` device, with no memory and no download, for parameter counts
and memory plans.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from insightedit.errors import UserError
from insightedit.hub_weights import DIFFUSERS_FILE, require_hub_weights
from insightedit.models.generation.edit_unet import EDIT_UNET_CONFIG, EditUNet, widen_conv_in
from insightedit.models.generation.latent_space import LatentSpace, PixelUnshuffleLatentSpace, VaeLatentSpace
from insightedit.models.loading import assign_or_copy
from insightedit.models.loads import report_loaded
from insightedit.models.text_encoder import (
    FOUNDATIONS_COMMAND,
    FrozenTextEncoder,
    clip_folder_text_parts,
    tiny_clip_text_config,
    tiny_clip_tokenizer,
)
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


class MissingCheckpointError(UserError, FileNotFoundError):
    """``generation.pretrained`` names no file (one line; for a tiny foundation, how to build it)."""


# where Lightning checkpoints keep the diffusers UNet: an EditorSystem (any member), a GenerationModule,
# and a GenerationModule written before the generator moved into ``model``
UNET_PREFIXES = ("editor.generation.unet.unet.", "model.unet.unet.", "unet.unet.")


def load_unet_from_checkpoint(unet: UNet2DConditionModel, path: Path) -> None:
    """Load the UNet of a Lightning checkpoint into ``unet``, every key.

    The checkpoint is an ``EditorSystem``'s (``editor.generation.unet.unet.*``, e.g. the tiny
    InstructPix2Pix member trained with its ``tiny/instruct_pix2pix.yaml``) or a ``GenerationModule``'s
    (``model.unet.unet.*``, or ``unet.unet.*`` from before the zoo). This is how a tiny twin starts from
    its own InstructPix2Pix stand-in, as the full system starts from ``timbrooks/instruct-pix2pix``. An
    image branch, in the checkpoint or in ``unet``, is left out (the members that have one initialise it
    from the UNet's ``to_k``/``to_v`` after this load).
    """
    if not path.is_file():
        hint = f"; build the tiny foundations with `{FOUNDATIONS_COMMAND}`" if "foundations" in path.parts else ""
        raise MissingCheckpointError(f"generation.pretrained: checkpoint {path} not found{hint}")
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
    missing, unexpected = assign_or_copy(unet, weights, strict=False)
    missing = [k for k in missing if ".processor." not in k]
    if missing or unexpected:
        raise ValueError(
            f"generation.pretrained: {path} does not fit this UNet config "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    left_out = f"{len(image_branch)} image-branch tensors left out" if image_branch else ""
    report_loaded("generation.pretrained", len(weights), path, f"the UNet; {left_out}" if left_out else "the UNet")


def _source_kind(pretrained: str | None) -> str:
    """``"none"``, ``"checkpoint"`` (a ``.ckpt``), ``"ours"`` (a ``save_pretrained`` folder) or ``"diffusers"``."""
    if pretrained is None:
        return "none"
    if Path(pretrained).suffix == ".ckpt":
        return "checkpoint"
    if (Path(pretrained) / EDIT_UNET_CONFIG).is_file():
        return "ours"
    return "diffusers"


def _local_config(kind: Any, source: str, name: str) -> dict[str, Any] | None:
    """Component ``name``'s config from a local folder or the hub cache (never the network); ``None`` if absent."""
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument
            warnings.simplefilter("ignore", UserWarning)
            return dict(kind.load_config(**_subfolder(source, name), local_files_only=True))
    except Exception:  # noqa: BLE001 - not on this machine: the preset's config stands in until the load step
        return None


def build_generation_components(
    preset: str = "tiny",
    pretrained: str | None = None,
    image_embed_dim: int | None = None,
    num_image_tokens: int = 4,
    image_scale: float = 1.0,
    unet_config: dict[str, Any] | None = None,
    latent: str = "auto",
    with_text_encoder: bool = True,
    text_encoder: str | None = None,
    device: str | torch.device | None = None,
) -> GenerationComponents:
    """Build the UNet, latent space, DDPM schedule and text encoder of ``preset``; no weights are read.

    The architecture comes from the preset, or from ``pretrained``'s config files when they are on this
    machine (a local folder, or the hub cache: never a download); :func:`load_generation_weights` then
    reads the weights.

    Args:
        preset: ``"tiny"`` or ``"full"``.
        pretrained: a hub id or local diffusers pipeline folder (``full``), a folder written by
            ``save_pretrained`` (either preset), or a Lightning checkpoint (``.ckpt``) of a
            text-conditioned ``GenerationModule`` whose UNet fits ``unet_config``. ``None``: no weights.
        image_embed_dim: width of the IAA embedding projected to ``f_img``; ``None`` means 768 for
            ``full``, 32 for ``tiny``; ``0`` builds no image branch (plain InstructPix2Pix).
        unet_config: overrides of the preset's UNet config (tiny twins of other sizes).
        latent: ``"auto"`` (the preset's), ``"vae"`` or ``"pixel_unshuffle"``.
        text_encoder: a CLIP folder (``CLIPModel.save_pretrained``, e.g. the tiny CLIP foundation's
            ``export/``) whose text tower and tokenizer are the text encoder, over ``pretrained``'s and the
            preset's; its config and tokenizer are read here when the folder exists (else the preset's
            stand in), its weights by :func:`insightedit.models.text_encoder.load_clip_folder_text_encoder`.
        device: ``"meta"`` builds without memory (the default for ``full`` without weights).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    if image_embed_dim is None:
        image_embed_dim = 768 if preset == "full" else 32
    if preset == "full" and pretrained is None and device is None:
        device = "meta"
    context = torch.device(device) if device is not None else torch.get_default_device()
    kind = _source_kind(pretrained)
    folder = pretrained if kind in ("ours", "diffusers") else None
    config = dict(FULL_UNET_CONFIG if preset == "full" else TINY_UNET_CONFIG)
    config.update(unet_config or {})
    scheduler_config = dict(STABLE_DIFFUSION_SCHEDULER)
    if folder is not None:
        config = _local_config(UNet2DConditionModel, folder, "unet") or config
        scheduler_config = _local_config(DDPMScheduler, folder, "scheduler") or scheduler_config
    if kind == "ours":  # a folder we wrote: the UNet comes with its image branch, whatever the arguments say
        branch = json.loads((Path(str(pretrained)) / EDIT_UNET_CONFIG).read_text())
        image_embed_dim = branch.get("image_embed_dim") or 0
        num_image_tokens = int(branch.get("num_image_tokens", num_image_tokens))
        image_scale = float(branch.get("image_scale", image_scale))
    # the tiny twin's frozen parts (text encoder, VAE) are a fixed "base model": same seed, same weights,
    # so a checkpoint that stores only trained weights restores the whole model
    with context, torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel.from_config(config)
        scheduler = DDPMScheduler.from_config(scheduler_config)
        edit_unet = EditUNet(
            unet,
            image_embed_dim=image_embed_dim or None,
            num_image_tokens=num_image_tokens,
            image_scale=image_scale,
        )
        latent_space = _build_latent_space(preset, folder, latent, edit_unet.unet)
        encoder = _build_text_encoder(preset, folder, text_encoder) if with_text_encoder else None
    return GenerationComponents(edit_unet, latent_space, scheduler, encoder)


def load_generation_weights(
    components: GenerationComponents, pretrained: str, with_text_encoder: bool = True
) -> GenerationComponents:
    """Read ``pretrained``'s weights into components built from it (:func:`build_generation_components`).

    The modules are loaded in place; the schedule and the tokenizer come from a folder's files, so the
    components are returned with them. ``with_text_encoder=False`` leaves a folder's text encoder out
    (the generator's comes from a CLIP folder instead). A hub id whose weights are not on this machine and cannot be
    downloaded is one :class:`~insightedit.errors.UserError`.
    """
    kind = _source_kind(pretrained)
    edit_unet = components.unet
    if kind == "checkpoint":
        load_unet_from_checkpoint(edit_unet.unet, Path(pretrained))
        edit_unet.reset_image_branch()
        return components
    if kind == "ours":  # the UNet with its image branch, as it was saved
        saved = EditUNet.from_pretrained(pretrained)
        state = saved.state_dict()
        assign_or_copy(edit_unet, state)
        report_loaded("generation.pretrained", len(state), pretrained, "the UNet and its image branch")
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    else:
        require_hub_weights("generation.pretrained", pretrained, DIFFUSERS_FILE)  # one line, not retries
        plain = UNet2DConditionModel.from_pretrained(**_subfolder(pretrained, "unet"))
        if plain.config.in_channels == plain.config.out_channels:  # widened as the constructor widened it
            widen_conv_in(plain, 2 * plain.config.in_channels)
        state = plain.state_dict()
        missing, unexpected = assign_or_copy(edit_unet.unet, state, strict=False, take=True)
        missing = [k for k in missing if ".processor." not in k]  # the image branch: initialised below
        if missing or unexpected:
            raise ValueError(
                f"generation.pretrained: {pretrained}'s UNet does not fit the one built from its config "
                f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
            )
        edit_unet.reset_image_branch()
        report_loaded("generation.pretrained", len(state), pretrained, "the UNet")
        scheduler = DDPMScheduler.from_pretrained(**_subfolder(pretrained, "scheduler"))
    if isinstance(components.latent_space, VaeLatentSpace):
        vae = AutoencoderKL.from_pretrained(**_subfolder(pretrained, "vae"))
        assign_or_copy(components.latent_space.vae, vae.state_dict(), take=True)
    text_encoder = components.text_encoder
    if text_encoder is not None and with_text_encoder:
        model = CLIPTextModel.from_pretrained(**_subfolder(pretrained, "text_encoder"))
        assign_or_copy(text_encoder.model, model.state_dict(), take=True)
        text_encoder.tokenizer = CLIPTokenizer.from_pretrained(**_subfolder(pretrained, "tokenizer"))
    return GenerationComponents(edit_unet, components.latent_space, scheduler, text_encoder)


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
    vae_config = _local_config(AutoencoderKL, pretrained, "vae") if pretrained is not None else None
    if vae_config is not None:
        vae = AutoencoderKL.from_config(vae_config)
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


def _build_text_encoder(preset: str, pretrained: str | None, clip_folder: str | None = None) -> FrozenTextEncoder:
    model: nn.Module
    tokenizer: CLIPTokenizer | None
    text_config = _text_encoder_config(pretrained) if pretrained is not None else None
    clip_parts = clip_folder_text_parts(clip_folder) if clip_folder is not None else None
    if clip_parts is not None:  # the CLIP folder's text tower, over the pipeline's and the preset's
        model = CLIPTextModel(clip_parts[0])
        tokenizer = clip_parts[1]
        if tokenizer is None and preset == "tiny":
            tokenizer = tiny_clip_tokenizer(cache_dir() / "tiny-clip-tokenizer")
    elif text_config is not None:
        model = CLIPTextModel(text_config)
        tokenizer = _local_tokenizer(pretrained)  # None until the load step when only on the hub
    elif preset == "full":
        model = CLIPTextModel(CLIPTextConfig(**FULL_TEXT_CONFIG))
        tokenizer = None  # SD1.5's vocabulary is not shipped; the meta build only needs the shapes
    else:
        model = CLIPTextModel(tiny_clip_text_config())
        tokenizer = tiny_clip_tokenizer(cache_dir() / "tiny-clip-tokenizer")
    return FrozenTextEncoder(model, tokenizer)


def _text_encoder_config(source: str) -> CLIPTextConfig | None:
    """The text encoder's config from a local folder or the hub cache (no download); ``None`` if absent."""
    try:
        return CLIPTextConfig.from_pretrained(**_subfolder(source, "text_encoder"), local_files_only=True)
    except Exception:  # noqa: BLE001 - not on this machine
        return None


def _local_tokenizer(source: str | None) -> CLIPTokenizer | None:
    """The tokenizer from a local folder or the hub cache (no download); ``None`` if absent."""
    if source is None:
        return None
    try:
        return CLIPTokenizer.from_pretrained(**_subfolder(source, "tokenizer"), local_files_only=True)
    except Exception:  # noqa: BLE001 - not on this machine: the load step reads it
        return None
