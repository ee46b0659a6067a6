"""The package's one image reader: every file, upload or byte string becomes pixels here, by one set of rules.

:func:`load_image` is the only place that opens an image (``data check``, training, ``edit``, the demo,
``evaluate`` and ``data build`` all call it). The rules, in the order they apply (docs/data.md, "How images
are read"):

1. Formats: PNG, JPEG (and its multi-picture MPO), WebP, GIF, BMP and TIFF only. Anything else (EPS, which PIL hands to
   Ghostscript, and every other plugin) is "not an image"; a 0-byte file is too.
2. The size is read from the header first: an image of more than ``max_pixels`` pixels (default
   89,478,485, PIL's own decompression-bomb threshold) is refused before any pixel is decoded.
3. Animated images (GIF, WebP, APNG): the first frame, noted in the fixes.
4. EXIF orientation is applied: the pixels are the image as a viewer displays it.
5. Modes become 8 bits: 16-bit integers ``rint(v * 255 / 65535)``; 32-bit integers the same when their
   maximum exceeds 255, else as they are; floats ``rint(v * 255)`` when the largest finite value is at
   most 1, else ``rint(v)`` (taken as 0-255), NaN as 0, both clipped to [0, 255]; palettes through their
   colours; CMYK and YCbCr by PIL's conversion. 16-bit colour PNGs are decoded by PIL to their high byte
   (``v >> 8``, within one level of the rule).
6. Alpha (RGBA, LA, PA, palette transparency) is composited over white:
   ``rint((c * a + 255 * (255 - a)) / 255)``.
7. Anything unusable raises :class:`UnreadableImage` whose text is one line, ``<what>: <where> (<why>)``
   or ``<what> <where> (<why>)``, the same in every command.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL's own default threshold; a header claiming more pixels is refused before decoding.
DEFAULT_MAX_PIXELS = 89_478_485
# The formats the reader opens; every other PIL plugin (EPS runs Ghostscript) is refused.
SAFE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO
# Alpha is composited over this background (white), the usual convention for cut-out images.
ALPHA_BACKGROUND = (255, 255, 255)
# EXIF orientation value → the transpose that displays the stored pixels (as ImageOps.exif_transpose).
ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO


class BadSample(Exception):
    """A record or file that cannot be used; ``str(error)`` is the one-line reason."""


class UnreadableImage(BadSample):
    """An image the reader refuses (missing, not an image, truncated, too large); the text is one line."""


@dataclass
class LoadedImage:
    """An 8-bit image as displayed, the exact fixes applied while reading it, and its stored geometry."""

    image: Image.Image
    fixes: list[str] = field(default_factory=list)
    transposed: bool = False
    raw_size: tuple[int, int] = (0, 0)
    orientation: int = 1


def _where(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(source, "name", "<image bytes>"))


def _stream(source: ImageSource, where: str) -> str | BinaryIO:
    """What ``Image.open`` gets: a path that exists and is a non-empty file, or a binary stream."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UnreadableImage(f"not an image or corrupt: {where} (empty file, 0 bytes)")
        return io.BytesIO(source)
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    if not path.exists():
        raise UnreadableImage(f"missing image {where} (not found)")
    if not path.is_file():
        raise UnreadableImage(f"missing image {where} (not a file)")
    if path.stat().st_size == 0:
        raise UnreadableImage(f"not an image or corrupt: {where} (empty file, 0 bytes)")
    return str(path)


def _too_large(where: str, limit: int, size: tuple[int, int] | None) -> UnreadableImage:
    if size is not None:
        claimed = f"is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    else:  # PIL refused the header itself: more than twice its threshold
        claimed = f"has more than {2 * (Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS):,} pixels"
    return UnreadableImage(
        f"too large to decode safely: {where} {claimed}, over the safe limit of {limit:,} (decompression bomb?)"
    )


def _decode_error(error: Exception, where: str) -> UnreadableImage:
    text = str(error) or type(error).__name__
    if isinstance(error, EOFError) or "truncated" in text:
        return UnreadableImage(f"truncated image {where} ({text})")
    return UnreadableImage(f"corrupt image {where} ({text})")


@contextmanager
def _opened(source: ImageSource, where: str, max_pixels: int) -> Iterator[Image.Image]:
    """The image with only its header read, refused when it claims more than ``max_pixels`` pixels."""
    stream = _stream(source, where)
    Image.init()  # register every plugin, so the allow-list names exist (a no-op after the first call)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below against our limit
            opened = Image.open(stream, formats=SAFE_FORMATS)
    except Image.DecompressionBombError:
        raise _too_large(where, max_pixels, None) from None
    except UnidentifiedImageError:
        raise UnreadableImage(f"not an image or corrupt: {where} (no {_FORMAT_NAMES} header)") from None
    except Exception as error:  # any failure parsing an untrusted header is a property of the file
        raise _decode_error(error, where) from None
    with opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise _too_large(where, max_pixels, (width, height))
        if width < 1 or height < 1:
            raise UnreadableImage(f"corrupt image {where} (size {width}x{height})")
        yield opened


def _gray_from(array: np.ndarray, peak: float) -> Image.Image:
    """A single-channel array scaled from [0, peak] to 8 bits (rounded half to even, clipped)."""
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0 * peak, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8), mode="L")


def _over_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_8bit(image: Image.Image, fixes: list[str] | None = None) -> Image.Image:
    """Any PIL mode as an 8-bit ``L`` or ``RGB`` image by the reader's rules; each fix is appended to ``fixes``."""
    fixes = [] if fixes is None else fixes
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image)
        peak = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        fixes.append("16-bit to 8-bit")
        return _gray_from(array, peak)
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        finite = array[np.isfinite(array)]
        unit = finite.size == 0 or float(finite.max()) <= 1.0
        fixes.append("float [0, 1] to 8-bit" if unit else "float [0, 255] to 8-bit")
        return _gray_from(array, 1.0 if unit else 255.0)
    if mode == "P":
        fixes.append("palette to RGB")
        has_alpha = "transparency" in image.info or image.palette is not None and image.palette.mode == "RGBA"
        if not has_alpha:
            return image.convert("RGB")
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        fixes.append("alpha composited over white")
        return _over_white(image)
    fixes.append("CMYK to RGB" if mode == "CMYK" else f"{mode} to RGB")
    return image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(0x0112, 1) or 1)
    except (TypeError, ValueError):
        return 1
    return value if value in ORIENTATION_TRANSPOSE else 1


def load_image(
    source: ImageSource, *, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> LoadedImage:
    """Read ``source`` (a path, bytes or a binary stream) as an 8-bit ``RGB`` or ``L`` image as displayed.

    Raises :class:`UnreadableImage` with a one-line reason; ``name`` is how messages call a byte source.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    where = _where(source, name)
    with _opened(source, where, max_pixels) as opened:
        raw_size = opened.size
        fixes: list[str] = []
        try:
            if getattr(opened, "is_animated", False):
                opened.seek(0)
                fixes.append("animated: first frame used")
            opened.load()
            orientation = _orientation(opened)
            pixels = to_8bit(opened, fixes)
            if orientation != 1:
                pixels = pixels.transpose(ORIENTATION_TRANSPOSE[orientation])
                fixes.append("EXIF orientation applied")
            pixels = pixels.convert(mode) if pixels.mode != mode or pixels is opened else pixels
        except Exception as error:  # any failure decoding an untrusted file is a property of the file
            raise _decode_error(error, where) from None
    return LoadedImage(pixels, fixes, orientation != 1, raw_size, orientation)


def load_rgb(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> LoadedImage:
    """:func:`load_image` as 8-bit RGB."""
    return load_image(source, mode="RGB", max_pixels=max_pixels, name=name)


def probe_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The displayed (width, height) from the header alone, by the same rules; raise :class:`UnreadableImage`."""
    where = _where(source, None)
    with _opened(source, where, max_pixels) as opened:
        width, height = opened.size
        try:
            if _orientation(opened) in (5, 6, 7, 8):
                width, height = height, width
        except Exception as error:  # a PNG whose EXIF follows the pixels is decoded to find it
            raise _decode_error(error, where) from None
    return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """An in-memory PIL image of any mode as 8-bit RGB by the reader's rules (the image itself if RGB)."""
    converted = to_8bit(image)
    return converted if converted.mode == "RGB" else converted.convert("RGB")
