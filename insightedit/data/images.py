"""Robust image loading and the paired geometric transform shared by source, target and mask.

Every image goes through :func:`load_rgb`: EXIF orientation, palette, CMYK, 16-bit and alpha modes are
fixed exactly (or by a stated rule) and counted; a missing, truncated or undecodable file raises
:class:`BadSample` with a one-line reason that the caller counts and skips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

# OpenAI CLIP normalisation (also LLaVA's CLIPImageProcessor).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Two images belong to one pair when their aspect ratios differ by less than this (relative). The
# official pipeline saves targets at short side 640 with sides floored to a multiple of 8, which
# changes the aspect by up to ~1.3%; 2% keeps those and rejects real mismatches.
ASPECT_TOLERANCE = 0.02

# Alpha is composited over this background (white), the usual convention for cut-out images.
ALPHA_BACKGROUND = (255, 255, 255)


class BadSample(Exception):
    """A record or file that cannot be used; ``str(error)`` is the one-line reason."""


@dataclass
class LoadedImage:
    """An RGB image and the exact fixes applied while loading it."""

    image: Image.Image
    fixes: list[str] = field(default_factory=list)
    transposed: bool = False
    raw_size: tuple[int, int] = (0, 0)
    orientation: int = 1


def _to_8bit_rgb(image: Image.Image, fixes: list[str]) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, recording which conversion was needed."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's convert("L") clips 16-bit values instead of scaling them; scale by 255/65535.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        fixes.append("16-bit to 8-bit")
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        fixes.append("float to 8-bit")
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        fixes.append("palette to RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        fixes.append("alpha composited over white")
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        fixes.append("CMYK to RGB")
    elif mode not in ("L", "1"):
        fixes.append(f"{mode} to RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> LoadedImage:
    """Open ``path`` as 8-bit RGB with EXIF orientation applied; raise :class:`BadSample` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise BadSample(f"missing image {path}")
    try:
        with Image.open(path) as opened:
            raw_size = opened.size
            opened.load()
            fixes: list[str] = []
            orientation = int(opened.getexif().get(0x0112, 1) or 1)
            oriented = ImageOps.exif_transpose(opened)
            transposed = orientation in range(2, 9)
            if transposed:
                fixes.append("EXIF orientation applied")
            rgb = _to_8bit_rgb(oriented, fixes)
            if rgb is opened:
                rgb = rgb.copy()
    except UnidentifiedImageError:
        raise BadSample(f"not an image or corrupt: {path}") from None
    except (OSError, SyntaxError, ValueError) as error:
        reason = "truncated" if "truncated" in str(error) else "corrupt"
        raise BadSample(f"{reason} image {path} ({error})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise BadSample(f"empty image {path}")
    return LoadedImage(rgb, fixes, transposed, raw_size, orientation)


def probe_image(path: str | Path) -> tuple[int, int]:
    """Read only the header of ``path``; return its displayed (width, height) or raise :class:`BadSample`."""
    path = Path(path)
    if not path.is_file():
        raise BadSample(f"missing image {path}")
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if opened.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except UnidentifiedImageError:
        raise BadSample(f"not an image or corrupt: {path}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadSample(f"corrupt image {path} ({error})") from None
    return width, height


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
