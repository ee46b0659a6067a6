"""Image loading for the data pipeline and the paired geometric transform shared by source, target and mask.

Every image is read by the package's one reader, :func:`insightedit.image_reader.load_image` (re-exported
here as :func:`load_rgb` and :func:`probe_image`): EXIF orientation, palette, CMYK, 16-bit, float and alpha
modes are fixed by its stated rules and counted; a missing, truncated, oversized or undecodable file
raises :class:`BadSample` with a one-line reason that the caller counts and skips.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from insightedit.image_reader import ALPHA_BACKGROUND as ALPHA_BACKGROUND
from insightedit.image_reader import BadSample as BadSample
from insightedit.image_reader import LoadedImage as LoadedImage
from insightedit.image_reader import UnreadableImage as UnreadableImage
from insightedit.image_reader import load_image as load_image
from insightedit.image_reader import load_rgb as load_rgb
from insightedit.image_reader import probe_image as probe_image

# OpenAI CLIP normalisation (also LLaVA's CLIPImageProcessor).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Two images belong to one pair when their aspect ratios differ by less than this (relative). The
# official pipeline saves targets at short side 640 with sides floored to a multiple of 8, which
# changes the aspect by up to ~1.3%; 2% keeps those and rejects real mismatches.
ASPECT_TOLERANCE = 0.02


def same_aspect(size_a: Sequence[int], size_b: Sequence[int], tolerance: float = ASPECT_TOLERANCE) -> bool:
    """Whether two (width, height) sizes have the same aspect ratio within ``tolerance``."""
    ratio_a = size_a[0] / size_a[1]
    ratio_b = size_b[0] / size_b[1]
    return abs(ratio_a - ratio_b) <= tolerance * max(ratio_a, ratio_b)


def center_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """Normalised (left, top, right, bottom) of the centred square that an aspect-preserving crop keeps."""
    side = min(width, height)
    left = (width - side) / 2 / width
    top = (height - side) / 2 / height
    return left, top, 1.0 - left, 1.0 - top


def resize_crop(
    image: Image.Image,
    box: tuple[float, float, float, float],
    resolution: int,
    resample: Image.Resampling,
) -> Image.Image:
    """Crop the normalised ``box`` of ``image`` and resize it to ``resolution`` square in one step.

    Taking the box in normalised coordinates keeps a target or mask of another pixel size (same
    aspect) aligned with its source; PIL's ``resize(box=...)`` samples sub-pixel boxes exactly.
    """
    width, height = image.size
    pixel_box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
    if pixel_box == (0.0, 0.0, float(width), float(height)) and image.size == (resolution, resolution):
        return image.copy()
    return image.resize((resolution, resolution), resample=resample, box=pixel_box)


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Binary ``L`` PIL mask → float32 (1, H, W) in {0, 1}."""
    array = (np.asarray(mask) > 0).astype(np.float32)
    return torch.from_numpy(array)[None]


def clip_preprocess(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> v2.Compose:
    """CLIP-style preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
