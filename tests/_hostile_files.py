"""The hostile-file battery: awkward but valid images with independently computed pixels, and bad files.

:func:`write_battery` writes every file into a folder and returns, per file, either the (H, W, 3) uint8
array a correct reader must produce (computed here with numpy from the values written, never by the
reader under test) or the exact one-line reason it must give (``{path}`` stands for the file's path).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

LIMIT = "89,478,485"  # the default safe limit, as the messages print it
PIL_HARD_LIMIT = "178,956,970"  # twice PIL's threshold: PIL refuses such headers itself
NOT_AN_IMAGE = "not an image or corrupt: {path} (no PNG, JPEG, WebP, GIF, BMP or TIFF header)"


@dataclass(frozen=True)
class Hostile:
    """One file of the battery: the pixels it must decode to, or the reason it must be refused with."""

    name: str
    expected: np.ndarray | None = None  # (H, W, 3) uint8 for files that must be read
    reason: str | None = None  # exact message (``{path}`` = the file) for files that must be refused
    fix: str | None = None  # the fix the reader must report

    def message(self, path: Path | str) -> str:
        """The exact one-line refusal of this file at ``path``."""
        assert self.reason is not None, f"{self.name} must be read, not refused"
        return self.reason.format(path=path)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: Iterable[bytes]) -> bytes:
    """A PNG written by hand (filter 0 rows), so headers and bit depths PIL cannot write are possible."""
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(b"\x00" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: a few kB that decode to gigabytes."""
    row = bytes((width + 7) // 8)
    return png_bytes(width, height, 1, 0, (row for _ in range(height)))


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c, a = colour.astype(np.int64), alpha.astype(np.int64)[..., None]
    return ((255 - a) + (c * a + 127) // 255).astype(np.uint8)  # rint((c*a + 255*(255-a)) / 255), no ties


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def write_battery(folder: Path, seed: int = 0) -> dict[str, Hostile]:
    """Write the battery into ``folder``; return its files by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = 4, 6  # not square: a rotation shows
    files: dict[str, Hostile] = {}

    def add(name: str, write: Callable[[Path], None], **hostile: object) -> None:
        write(folder / name)
        files[name] = Hostile(name, **hostile)  # type: ignore[arg-type]

    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    add("rgb.png", Image.fromarray(rgb).save, expected=rgb)

    cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    # PIL's CMYK → RGB: (255 - ink) scaled by (255 - K) / 255, rounded.
    ink, key = cmyk[..., :3].astype(np.int64), cmyk[..., 3:].astype(np.int64)
    add(
        "cmyk.tif",
        Image.fromarray(cmyk, mode="CMYK").save,
        expected=np.rint((255 - ink) * (255 - key) / 255).astype(np.uint8),
        fix="CMYK to RGB",
    )

    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (h, w), dtype=np.uint8)
    paletted = Image.fromarray(index, mode="P")
    paletted.putpalette(palette.tobytes())
    add("palette.png", paletted.save, expected=palette[index], fix="palette to RGB")

    grey, alpha = rng.integers(0, 256, (h, w), dtype=np.uint8), rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    la = Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA")
    add(
        "la.png",
        la.save,
        expected=_grey3(_over_white(grey[..., None], alpha)[..., 0]),
        fix="alpha composited over white",
    )

    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    add(
        "rgba.png",
        Image.fromarray(rgba, mode="RGBA").save,
        expected=_over_white(rgb, alpha),
        fix="alpha composited over white",
    )

    grey16 = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    grey16[0, :3] = (0, 65535, 255)  # 255 must become 1, not 255 (8-bit clipping) nor 0
    add(
        "grey16.png",
        Image.fromarray(grey16).save,
        expected=_grey3(np.rint(grey16.astype(np.float64) * 255 / 65535)),
        fix="16-bit to 8-bit",
    )

    rgb16 = rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    add(
        "rgb16.png",
        lambda p: p.write_bytes(png_bytes(w, h, 16, 2, (row.astype(">u2").tobytes() for row in rgb16))),
        expected=(rgb16 >> 8).astype(np.uint8),  # PIL keeps the high byte of 16-bit colour
    )

    unit = rng.random((h, w), dtype=np.float32)
    unit[0, :2] = (0.0, 1.0)
    add(
        "float01.tif",
        Image.fromarray(unit, mode="F").save,
        expected=_grey3(np.rint(unit.astype(np.float64) * 255)),
        fix="float [0, 1] to 8-bit",
    )

    wide = (rng.random((h, w), dtype=np.float32) * 255).astype(np.float32)
    wide[0, :4] = (np.nan, -5.0, 300.0, 254.5)  # NaN → 0, clipped, half to even
    expected_wide = np.clip(np.rint(np.nan_to_num(wide.astype(np.float64), nan=0.0)), 0, 255)
    add(
        "float255.tif",
        Image.fromarray(wide, mode="F").save,
        expected=_grey3(expected_wide),
        fix="float [0, 255] to 8-bit",
    )

    exif6 = Image.Exif()
    exif6[0x0112] = 6  # displayed = stored turned 90° clockwise
    stored = np.ascontiguousarray(np.rot90(rgb, k=1))  # (w, h, 3)
    add(
        "exif6.png",
        lambda p: Image.fromarray(stored).save(p, exif=exif6),
        expected=np.rot90(stored, k=-1),
        fix="EXIF orientation applied",
    )

    exif8 = Image.Exif()
    exif8[0x0112] = 8  # displayed = stored turned 90° anticlockwise
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)).save(jpeg, "JPEG", quality=95, exif=exif8)
    with Image.open(io.BytesIO(jpeg.getvalue())) as raw:  # the stored pixels, orientation not applied
        stored_jpeg = np.asarray(raw.convert("RGB"))
    add(
        "exif8.jpg",
        lambda p: p.write_bytes(jpeg.getvalue()),
        expected=np.rot90(stored_jpeg, k=1),
        fix="EXIF orientation applied",
    )

    one = np.array([[[12, 34, 56]]], dtype=np.uint8)
    add("one_px.png", Image.fromarray(one).save, expected=one)

    very_wide = rng.integers(0, 256, (2, 20000, 3), dtype=np.uint8)
    add("wide_20000x2.png", lambda p: Image.fromarray(very_wide).save(p, compress_level=1), expected=very_wide)

    add("lossless.webp", lambda p: Image.fromarray(rgb).save(p, lossless=True, exact=True), expected=rgb)

    frames = []
    for _ in range(3):
        frame = Image.fromarray(rng.integers(0, 8, (h, w), dtype=np.uint8), mode="P")
        frame.putpalette(palette[:8].tobytes())
        frames.append(frame)
    first = palette[:8][np.asarray(frames[0])]
    add(
        "animated.gif",
        lambda p: frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0),
        expected=first,
        fix="animated: first frame used",
    )

    add(
        "bomb_under_limit.png",  # 4 Mpx in about a kB: under the limit, so it is read
        lambda p: p.write_bytes(_bomb(2000, 2000)),
        expected=np.zeros((2000, 2000, 3), dtype=np.uint8),
    )

    # -- refused --
    truncated = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated, "PNG")
    add(
        "truncated.png",
        lambda p: p.write_bytes(truncated.getvalue()[: len(truncated.getvalue()) // 2]),
        reason="truncated image {path} (image file is truncated)",
    )
    add("empty.png", lambda p: p.write_bytes(b""), reason="not an image or corrupt: {path} (empty file, 0 bytes)")
    add("text.png", lambda p: p.write_text("this is a text file, not a picture\n"), reason=NOT_AN_IMAGE)
    add(
        "ghostscript.eps",  # PIL would hand EPS to Ghostscript: refused before any plugin reads it
        lambda p: p.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"),
        reason=NOT_AN_IMAGE,
    )
    add(
        "bomb_100mpx.png",  # over the limit, under PIL's own refusal: the header's size is reported
        lambda p: p.write_bytes(_bomb(10000, 10000)),
        reason="too large to decode safely: {path} is 10000x10000 = 100,000,000 pixels, over the safe limit of "
        f"{LIMIT} (decompression bomb?)",
    )
    add(
        "bomb_400mpx.png",
        lambda p: p.write_bytes(_bomb(20000, 20000)),
        reason=f"too large to decode safely: {{path}} has more than {PIL_HARD_LIMIT} pixels, over the safe limit "
        f"of {LIMIT} (decompression bomb?)",
    )
    add(
        "header_only_bomb.png",  # the header claims 108 Mpx and no pixel data follows
        lambda p: p.write_bytes(png_bytes(12000, 9000, 8, 2, [])),
        reason="too large to decode safely: {path} is 12000x9000 = 108,000,000 pixels, over the safe limit of "
        f"{LIMIT} (decompression bomb?)",
    )
    return files


def good(files: dict[str, Hostile]) -> dict[str, Hostile]:
    """The files that must be read."""
    return {name: f for name, f in files.items() if f.expected is not None}


def bad(files: dict[str, Hostile]) -> dict[str, Hostile]:
    """The files that must be refused."""
    return {name: f for name, f in files.items() if f.expected is None}
