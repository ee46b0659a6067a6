"""Synthetic scenes: a few flat-coloured shapes on a plain or two-tone background, rendered exactly.

Objects are rasterised once as boolean masks by PIL's ``ImageDraw`` (which never anti-aliases) and
painted by numpy assignment, so every pixel is either background or exactly one object colour. Object
colours are saturated and background colours are near-grey, so no object pixel ever equals a
background pixel; objects never touch (their boxes keep a 2-pixel gap). Hence removing or recolouring
an object changes exactly the pixels of its mask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
# Near-grey backgrounds: channel spread <= 30, while every object colour spreads >= 130.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light grey": (200, 200, 200),
    "grey": (128, 128, 128),
    "beige": (225, 215, 195),
    "pale blue": (175, 185, 200),
    "dark grey": (70, 70, 80),
}


@dataclass(frozen=True)
class SceneObject:
    """One shape: kind, colour name, centre (x, y) and half-size in pixels."""

    shape: str
    colour: str
    x: int
    y: int
    radius: int

    @property
    def name(self) -> str:
        """``colour shape``, e.g. ``red circle``."""
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x0, y0, x1, y1) that the shape fills to its edges."""
        return self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius

    def mask(self, size: int) -> np.ndarray:
        """Bool (size, size) mask of the rasterised shape."""
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        x0, y0, x1, y1 = self.box()
        if self.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=255)
        elif self.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=255)
        else:
            draw.polygon([(self.x, y0), (x1, y1), (x0, y1)], fill=255)
        return np.asarray(canvas) > 0

    def separated_from(self, other: SceneObject, gap: int = 2) -> bool:
        """Whether the two boxes are at least ``gap`` pixels apart along some axis."""
        a, b = self.box(), other.box()
        return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


@dataclass(frozen=True)
class Scene:
    """A square canvas of ``size`` pixels: background (one or two colours, split) and objects."""

    size: int
    background: tuple[str, ...]
    split: str  # "none", "horizontal" (top/bottom) or "vertical" (left/right)
    objects: tuple[SceneObject, ...]

    def render_background(self) -> np.ndarray:
        """(size, size, 3) uint8 background."""
        image = np.empty((self.size, self.size, 3), dtype=np.uint8)
        image[:] = BACKGROUNDS[self.background[0]]
        half = self.size // 2
        if self.split == "horizontal":
            image[half:] = BACKGROUNDS[self.background[1]]
        elif self.split == "vertical":
            image[:, half:] = BACKGROUNDS[self.background[1]]
        return image

    def render(self) -> np.ndarray:
        """(size, size, 3) uint8 image of the scene."""
        image = self.render_background()
        for obj in self.objects:
            image[obj.mask(self.size)] = COLOURS[obj.colour]
        return image

    def without(self, index: int) -> Scene:
        """The scene with object ``index`` removed."""
        return replace(self, objects=self.objects[:index] + self.objects[index + 1 :])

    def swapped(self, index: int, new: SceneObject) -> Scene:
        """The scene with object ``index`` replaced by ``new``."""
        return replace(self, objects=self.objects[:index] + (new,) + self.objects[index + 1 :])

    def background_name(self) -> str:
        """``light grey`` or ``light grey and beige``."""
        return " and ".join(self.background) if self.split != "none" else self.background[0]

    def caption(self) -> str:
        """A plain caption listing objects left to right, then the background."""
        if not self.objects:
            return f"an empty {self.background_name()} background"
        names = [f"a {obj.name}" for obj in sorted(self.objects, key=lambda o: (o.x, o.y))]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{listed} on a {self.background_name()} background"


def where(obj: SceneObject, size: int) -> str:
    """Coarse 3x3 location phrase of an object's centre, e.g. ``in the top left``."""
    row = ("top", "middle", "bottom")[min(2, obj.y * 3 // size)]
    col = ("left", "centre", "right")[min(2, obj.x * 3 // size)]
    if row == "middle" and col == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"in the {row} {col}"


def random_scene(rng: np.random.Generator, size: int, max_objects: int = 3) -> Scene:
    """Draw a scene of 1..``max_objects`` non-touching objects with distinct (colour, shape) pairs."""
    names = list(BACKGROUNDS)
    split = ("none", "horizontal", "vertical")[int(rng.integers(3))]
    first = names[int(rng.integers(len(names)))]
    second = names[int(rng.integers(len(names)))] if split != "none" else first
    if second == first:
        split = "none"
    background = (first,) if split == "none" else (first, second)
    low, high = max(2, round(size * 0.07)), max(3, round(size * 0.16))
    wanted = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    for _ in range(wanted * 30):
        if len(objects) == wanted:
            break
        radius = int(rng.integers(low, high + 1))
        obj = SceneObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
            x=int(rng.integers(radius, size - radius)),
            y=int(rng.integers(radius, size - radius)),
            radius=radius,
        )
        if all(obj.separated_from(o) and obj.name != o.name for o in objects):
            objects.append(obj)
    return Scene(size, background, split, tuple(objects))


def to_image(array: np.ndarray) -> Image.Image:
    """uint8 (H, W, 3) array → RGB PIL image."""
    return Image.fromarray(array, mode="RGB")
