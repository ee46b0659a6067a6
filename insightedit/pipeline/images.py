"""Images in and out of the pipeline: safe reading, the MLLM's view, the UNet's working size, PIL output.

The pipeline takes PIL images or tensors ``(3, H, W)`` / ``(B, 3, H, W)`` in ``[0, 1]`` (diffusers'
convention). The MLLM sees what it saw in training: the short side resized (bicubic) to its image size,
centre-cropped and CLIP-normalised. The UNet sees the whole image at a *working size* with the source's
aspect ratio, each side a multiple of what the UNet accepts; the result is resized back to the source's
size, so any aspect ratio goes in and comes out unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from insightedit.data.images import CLIP_MEAN, CLIP_STD
from insightedit.errors import UserError
from insightedit.image_reader import DEFAULT_MAX_PIXELS, UnreadableImage, load_rgb, to_rgb

ImageInput = Image.Image | torch.Tensor


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` with the package's one reader as 8-bit RGB, or raise :class:`UserError` with its reason.

    The header is read first: an image of more than ``max_pixels`` pixels is refused before it is
    decoded (a decompression bomb can claim gigapixels in a few hundred bytes).
    """
    try:
        return load_rgb(path, max_pixels=max_pixels).image
    except UnreadableImage as error:
        raise UserError(str(error)) from None


def to_unit_tensor(image: ImageInput) -> torch.Tensor:
    """One image as float32 (3, H, W) in [0, 1]; PIL images of any mode become RGB by the reader's rules."""
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
        return torch.from_numpy(array.transpose(2, 0, 1).copy())
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"images must be PIL images or tensors, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"an image tensor must be (3, H, W) in [0, 1], got shape {tuple(image.shape)}")
    return image.detach().float().cpu().clamp(0, 1)


def split_images(images: ImageInput | list[ImageInput]) -> list[torch.Tensor]:
    """A PIL image, a list of them, or a (3, H, W) / (B, 3, H, W) tensor → a list of (3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return [to_unit_tensor(image) for image in images]
    if isinstance(images, (list, tuple)):
        return [to_unit_tensor(image) for image in images]
    return [to_unit_tensor(images)]


def mllm_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """The MLLM's input: short side to ``size`` (bicubic), centre crop, CLIP-normalised: (3, size, size)."""
    transform = v2.Compose(
        [
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.Normalize(mean=list(CLIP_MEAN), std=list(CLIP_STD)),
        ]
    )
    return transform(image)


def working_size(height: int, width: int, multiple: int, resolution: int | None) -> tuple[int, int]:
    """(h, w) with the source's aspect, each a multiple of ``multiple``, about ``resolution``² pixels.

    ``resolution=None`` keeps the source's own size (rounded to the nearest multiple, at least one).
    """
    scale = 1.0 if resolution is None else resolution / math.sqrt(height * width)
    h = max(multiple, round(height * scale / multiple) * multiple)
    w = max(multiple, round(width * scale / multiple) * multiple)
    return int(h), int(w)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of (B, 3, H, W) to ``size`` (no-op when already that size)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → an RGB PIL image (rounded to 8 bits)."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)
