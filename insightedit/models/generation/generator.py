"""The editing generator: InstructPix2Pix's UNet with InsightEdit's additions, its diffusion loss and sampler.

No Lightning here: :class:`EditGenerator` is the math every member of the zoo shares (the UNet with the
optional image branch and ``v_txt``, the latent space, the noise schedule, the frozen text encoder and the
null text condition), the diffusion loss with classifier-free-guidance dropout and timestep sampling,
and the dual-guidance sampler. :class:`insightedit.systems.generation.GenerationModule` trains it on its
own; every editor (:mod:`insightedit.models.editor`) holds one as ``generation``.

Parameterisations: ``epsilon`` (the paper's, and InstructPix2Pix's weights), ``v_prediction`` and
``sample`` (the clean latent). With ``residual=True`` the diffused variable is the change
``z_tar − z_src`` instead of ``z_tar``, so "change nothing" is the zero prediction; the sampler adds
``z_src`` back. Residual ``sample`` prediction is what lets a tiny CPU twin learn to edit
(docs/deviations.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from insightedit.models.generation.edit_unet import EditUNet
from insightedit.models.generation.latent_space import PixelUnshuffleLatentSpace, VaeLatentSpace
from insightedit.models.generation.presets import (
    GenerationComponents,
    build_generation_components,
    load_generation_weights,
)
from insightedit.models.generation.sampling import sample_with_dual_guidance
from insightedit.models.loading import PretrainedPart
from insightedit.models.text_encoder import load_clip_folder_text_encoder

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
GENERATION_CONFIG = "generation_config.json"


class EditGenerator(PretrainedPart, nn.Module):
    """InstructPix2Pix's UNet with InsightEdit's decoupled cross-attention and ``v_txt``, and its loss.

    Args:
        preset: ``"tiny"`` (CPU twin) or ``"full"`` (InstructPix2Pix's SD1.5 UNet).
        pretrained: hub id, local folder or ``.ckpt`` with weights (see :func:`build_generation_components`);
            built from its config here, read by :meth:`load_pretrained` (or
            :func:`insightedit.models.loading.load_pretrained` on the editor).
        image_embed_dim: IAA embedding width (``None``: preset default; ``0``: no image branch).
        num_image_tokens: N image tokens in ``f_img``.
        image_scale: λ, the image branch's weight (changeable later via ``unet.image_scale``).
        unet_config: overrides of the preset's UNet config.
        latent: ``"auto"``, ``"vae"`` or ``"pixel_unshuffle"``.
        with_text_encoder: build the frozen text encoder (``False``: conditions come as ``f_txt``).
        text_encoder: a CLIP folder (``CLIPModel.save_pretrained`` with its tokenizer, e.g. the tiny CLIP
            foundation's ``checkpoints/tiny/foundations/clip/export``) whose text tower is the frozen
            text encoder, read by :meth:`load_pretrained`; ``None``: ``pretrained``'s or the preset's.
        train_unet: train the whole UNet (else only the image branch, if ``train_image_branch``).
        train_image_branch: train the image projection and ``to_k_ip``/``to_v_ip``.
        drop_text_prob, drop_source_prob, drop_both_prob: classifier-free-guidance dropout rates.
        prediction_type: ``"epsilon"`` (the paper's), ``"v_prediction"`` or ``"sample"`` (the clean
            latent, or the clean residual with ``residual``).
        residual: diffuse ``z_tar − z_src`` rather than ``z_tar`` (the sampler adds ``z_src`` back).
        timestep_power: training timesteps are ``⌊T·u^p⌋`` with ``u ~ U(0, 1)``; ``1`` is uniform,
            ``p < 1`` favours high noise (where the edit's layout is decided).
        gradient_checkpointing: recompute UNet activations in the backward pass.
    """

    def __init__(
        self,
        preset: str = "tiny",
        pretrained: str | None = None,
        image_embed_dim: int | None = None,
        num_image_tokens: int = 4,
        image_scale: float = 1.0,
        unet_config: dict[str, Any] | None = None,
        latent: str = "auto",
        with_text_encoder: bool = True,
        text_encoder: str | None = None,
        train_unet: bool = True,
        train_image_branch: bool = True,
        drop_text_prob: float = 0.05,
        drop_source_prob: float = 0.05,
        drop_both_prob: float = 0.05,
        prediction_type: str = "epsilon",
        residual: bool = False,
        timestep_power: float = 1.0,
        gradient_checkpointing: bool = False,
        device: str | None = None,
    ) -> None:
        self.settings: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if timestep_power <= 0:
            raise ValueError(f"timestep_power must be > 0, got {timestep_power}")
        if min(drop_text_prob, drop_source_prob, drop_both_prob) < 0 or (
            drop_text_prob + drop_source_prob + drop_both_prob > 1
        ):
            raise ValueError("dropout probabilities must be >= 0 and sum to at most 1")
        components = build_generation_components(
            preset=preset,
            pretrained=pretrained,
            image_embed_dim=image_embed_dim,
            num_image_tokens=num_image_tokens,
            image_scale=image_scale,
            unet_config=unet_config,
            latent=latent,
            with_text_encoder=with_text_encoder,
            text_encoder=text_encoder,
            device=device,
        )
        self.unet: EditUNet = components.unet
        self.latent_space = components.latent_space
        self.noise_scheduler: DDPMScheduler = components.noise_scheduler
        self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        self.text_encoder = components.text_encoder
        self.pretrained = pretrained
        self.text_encoder_source = text_encoder if with_text_encoder else None
        self.register_buffer("null_f_txt", self._null_text_condition(), persistent=True)
        if gradient_checkpointing:
            self.unet.unet.enable_gradient_checkpointing()
        self.set_trainable(train_unet=train_unet, train_image_branch=train_image_branch)

    @property
    def pretrained_pending(self) -> bool:
        """Whether weights are named (``pretrained`` or the ``text_encoder`` folder) and not loaded yet."""
        named = self.pretrained is not None or self.text_encoder_source is not None
        return named and not self.pretrained_loaded

    def load_pretrained(self) -> None:
        """Read the weights ``pretrained`` names into this generator (the schedule and tokenizer too, from a folder).

        The text encoder comes from the ``text_encoder`` CLIP folder when one is named (a missing folder is
        one :class:`~insightedit.errors.UserError` line); the null condition is then re-encoded.
        """
        if self.pretrained is None and self.text_encoder_source is None:
            return
        trainable = {name: p.requires_grad for name, p in self.named_parameters()}
        if self.pretrained is not None:
            components = GenerationComponents(self.unet, self.latent_space, self.noise_scheduler, self.text_encoder)
            loaded = load_generation_weights(
                components, self.pretrained, with_text_encoder=self.text_encoder_source is None
            )
            prediction_type = self.noise_scheduler.config.prediction_type
            self.noise_scheduler = loaded.noise_scheduler
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        if self.text_encoder is not None and self.text_encoder_source is not None:
            load_clip_folder_text_encoder(self.text_encoder, self.text_encoder_source)
        self.null_f_txt = self._null_text_condition().to(self.null_f_txt.dtype)
        for name, parameter in self.named_parameters():  # what trains is the constructor's choice
            parameter.requires_grad_(trainable.get(name, parameter.requires_grad))
        self.pretrained_loaded = True

    # ----------------------------------------------------------------------------------- structure
    def _null_text_condition(self) -> torch.Tensor:
        """The text condition of the empty instruction (B=1, L, D); zeros without a usable encoder."""
        width = int(self.unet.unet.config.cross_attention_dim)
        reference = next(self.unet.parameters())
        if self.text_encoder is not None and self.text_encoder.tokenizer is not None and not reference.is_meta:
            null = self.text_encoder([""])
            if null.shape[-1] != width:
                raise ValueError(f"text encoder width {null.shape[-1]} != UNet cross_attention_dim {width}")
            return null
        return torch.zeros(1, 77, width, device=reference.device)

    def set_trainable(self, train_unet: bool, train_image_branch: bool) -> None:
        """Choose what trains: the whole UNet, only the image branch, or nothing."""
        self.unet.requires_grad_(train_unet)
        if not train_unet:
            for parameter in self.unet.image_branch_parameters():
                parameter.requires_grad_(train_image_branch)
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False)
        if isinstance(self.latent_space, VaeLatentSpace):
            self.latent_space.requires_grad_(False)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """The frozen text encoder's condition for ``texts`` (B, 77, D)."""
        if self.text_encoder is None:
            raise RuntimeError("this generation module has no text encoder: give `text_embeds` in the batch")
        return self.text_encoder(texts)

    # ----------------------------------------------------------------------------------------- loss
    def _cfg_dropout(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample masks (B,) of which samples lose the instruction and which lose the source."""
        text, source, both = (self.settings[k] for k in ("drop_text_prob", "drop_source_prob", "drop_both_prob"))
        u = torch.rand(batch_size, generator=generator, device=device)
        drop_text = u < text + both
        drop_source = (u >= text) & (u < text + both + source)
        return drop_text, drop_source

    def diffusion_loss(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        f_txt: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        v_txt: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``L_diff``: MSE of the UNet's prediction of the noise, ``v`` or clean (residual) latent.

        ``source``/``target`` are images (B, 3, H, W) in [-1, 1]; ``f_txt`` (B, L, D); ``image_embeds``
        (B, E); ``v_txt`` (B, C0, h, w). Applies classifier-free-guidance dropout in training mode.
        """
        batch = source.shape[0]
        device = source.device
        target_latents = self.latent_space.encode_target(target, generator=generator)
        source_latents = self.latent_space.encode_source(source)
        if self.settings["residual"]:
            target_latents = target_latents - source_latents
        noise = torch.randn(target_latents.shape, generator=generator, device=device, dtype=target_latents.dtype)
        timesteps = self._sample_timesteps(batch, generator, device)
        noisy = self.noise_scheduler.add_noise(target_latents, noise, timesteps)
        if self.training:
            drop_text, drop_source = self._cfg_dropout(batch, generator, device)
            f_txt = torch.where(drop_text[:, None, None], self.null_f_txt.to(f_txt.dtype), f_txt)
            if image_embeds is not None:
                image_embeds = image_embeds * (~drop_text)[:, None].to(image_embeds.dtype)
            source_latents = source_latents * (~drop_source)[:, None, None, None].to(source_latents.dtype)
        prediction = self.unet(noisy, source_latents, timesteps, f_txt, image_embeds=image_embeds, v_txt=v_txt)
        kind = self.settings["prediction_type"]
        if kind == "epsilon":
            goal = noise
        elif kind == "sample":
            goal = target_latents
        else:
            goal = self.noise_scheduler.get_velocity(target_latents, noise, timesteps)
        return F.mse_loss(prediction.float(), goal.float())

    def _sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Training timesteps (B,): uniform, or ``⌊T·u^p⌋`` biased to high noise by ``timestep_power``."""
        steps = int(self.noise_scheduler.config.num_train_timesteps)
        power = float(self.settings.get("timestep_power", 1.0))
        if power == 1.0:
            return torch.randint(0, steps, (batch_size,), generator=generator, device=device)
        u = torch.rand(batch_size, generator=generator, device=device)
        return (u.pow(power) * steps).long().clamp_(max=steps - 1)

    def sampling_scheduler(self) -> DDIMScheduler:
        """DDIM on the training schedule; a residual's clean range is twice the latent's (``a − b``)."""
        config = self.noise_scheduler.config
        if not self.settings.get("residual", False):
            return DDIMScheduler.from_config(config)
        return DDIMScheduler.from_config(config, clip_sample_range=2.0 * float(config.get("clip_sample_range", 1.0)))

    # ------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def edit(
        self,
        source: torch.Tensor,
        f_txt: torch.Tensor | None = None,
        instructions: list[str] | None = None,
        image_embeds: torch.Tensor | None = None,
        v_txt: torch.Tensor | None = None,
        text_guidance: float = 7.5,
        image_guidance: float = 1.5,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        scheduler: Any | None = None,
    ) -> torch.Tensor:
        """Edit ``source`` images (B, 3, H, W) in [-1, 1]; return the edited images in [-1, 1].

        The instruction comes as ``f_txt`` (B, L, D) or as strings for the text encoder. The default
        sampler is DDIM built from the training schedule (:meth:`sampling_scheduler`). With ``residual``
        the sampled latent is the change and the source latent is added back before decoding.
        """
        if f_txt is None:
            if instructions is None:
                raise ValueError("give either f_txt or instructions")
            f_txt = self.encode_text(instructions)
        scheduler = scheduler or self.sampling_scheduler()
        source_latents = self.latent_space.encode_source(source)
        latents = sample_with_dual_guidance(
            self.unet,
            scheduler,
            source_latents,
            f_txt,
            self.null_f_txt,
            image_embeds=image_embeds,
            v_txt=v_txt,
            text_guidance=text_guidance,
            image_guidance=image_guidance,
            num_inference_steps=num_inference_steps,
            generator=generator,
        )
        if self.settings.get("residual", False):
            latents = latents + source_latents
        return self.latent_space.decode(latents).clamp(-1, 1)

    # ------------------------------------------------------------------------------- save and load
    def save_pretrained(self, directory: str | Path) -> None:
        """Write a self-contained folder: UNet (diffusers), image branch, scheduler, text encoder, VAE."""
        directory = Path(directory)
        self.unet.save_pretrained(directory)
        self.noise_scheduler.save_pretrained(directory / "scheduler")
        if self.text_encoder is not None:
            self.text_encoder.model.save_pretrained(directory / "text_encoder")
            if self.text_encoder.tokenizer is not None:
                self.text_encoder.tokenizer.save_pretrained(directory / "tokenizer")
        latent: dict[str, Any]
        if isinstance(self.latent_space, VaeLatentSpace):
            self.latent_space.vae.save_pretrained(directory / "vae")
            latent = {"kind": "vae"}
        elif isinstance(self.latent_space, PixelUnshuffleLatentSpace):
            latent = {"kind": "pixel_unshuffle", "factor": self.latent_space.factor}
        else:
            raise TypeError(f"cannot save latent space {type(self.latent_space).__name__}")
        settings = {"latent": latent, "hparams": {k: v for k, v in self.settings.items() if k != "pretrained"}}
        (directory / GENERATION_CONFIG).write_text(json.dumps(settings, indent=2, default=str) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> EditGenerator:
        """Load a folder written by :meth:`save_pretrained` (weights, image branch and settings)."""
        directory = Path(directory)
        config_path = directory / GENERATION_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not an EditGenerator.save_pretrained folder")
        settings = json.loads(config_path.read_text())
        hparams = dict(settings["hparams"])
        hparams["latent"] = settings["latent"]["kind"]
        hparams.pop("device", None)
        hparams.pop("text_encoder", None)  # the folder holds the text encoder it was saved with
        for trainer_only in ("learning_rate", "weight_decay"):  # folders written by GenerationModule before
            hparams.pop(trainer_only, None)
        generator = cls(**hparams, pretrained=str(directory))
        generator.load_pretrained()
        return generator


__all__ = ["GENERATION_CONFIG", "PREDICTION_TYPES", "EditGenerator"]
