"""Latent spaces the generation UNet denoises in: a diffusers VAE, or an exact pixel-unshuffle space.

A latent space maps images in ``[-1, 1]`` to latents and back. The generation module treats the two
latents of an edit differently, as InstructPix2Pix does: the *target* latent is the one that gets noised
(scaled by the VAE's scaling factor), the *source* latent is only concatenated to the noisy input (the
mode of the posterior, unscaled). For the exact space both are the same rearrangement of pixels.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class LatentSpace(Protocol):
    """What the generation module needs from a latent space."""

    channels: int
    downsample: int

    def encode_target(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent of the image to be generated (noised during training)."""
        ...

    def encode_source(self, images: torch.Tensor) -> torch.Tensor:
        """Latent of the conditioning image (concatenated to the noisy latent)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` from latents produced by the denoiser."""
        ...


class PixelUnshuffleLatentSpace(nn.Module):
    """An exact latent space: ``(3, H, W) -> (3·f², H/f, W/f)`` by space-to-depth, decoded by its inverse.

    It has no parameters, so decoding is lossless and image metrics measure the denoiser alone. It keeps
    the UNet's attention at a coarse grid (``H/f``) which is what makes CPU training affordable.
    """

    def __init__(self, factor: int = 4, image_channels: int = 3) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.downsample = factor
        self.channels = image_channels * factor * factor

    def encode_target(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Space-to-depth of ``images`` (B, 3, H, W) -> (B, 3f², H/f, W/f)."""
        return F.pixel_unshuffle(images, self.factor)

    def encode_source(self, images: torch.Tensor) -> torch.Tensor:
        """Same rearrangement as :meth:`encode_target`."""
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Depth-to-space, the exact inverse of the encoders."""
        return F.pixel_shuffle(latents, self.factor)


class VaeLatentSpace(nn.Module):
    """A frozen diffusers ``AutoencoderKL``: targets sampled and scaled, sources at the posterior mode."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> VaeLatentSpace:
        """Keep the frozen VAE in eval mode whatever the parent does."""
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode_target(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample times the scaling factor (InstructPix2Pix's training target)."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.sample(generator=generator) * self.scaling_factor

    @torch.no_grad()
    def encode_source(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior mode, unscaled, as InstructPix2Pix conditions on it."""
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents back to images in ``[-1, 1]`` (clamped)."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return images.clamp(-1, 1)
