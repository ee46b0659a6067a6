"""What each step asks of its backend: the roles (captioner, segmenter, replacer, inpainter, rewriter) and their data.

Every backend (oracle, chat, local models) implements one of these protocols; step 5 uses the VIEScore
:class:`~insightedit.evaluation.viescore.judges.Judge` protocol unchanged. ``setup(device)`` loads
weights onto the predict job's device, once per rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image


def clean_name(name: str) -> str:
    """An object name safe for file names and prompts: lower case, words and hyphens, single spaces."""
    return " ".join(re.sub(r"[^\w\s-]", " ", str(name).lower()).split())


@dataclass
class ObjectInfo:
    """One object of step 1's list: a short name (the grounding phrase), a category, a detailed caption."""

    name: str
    category: str = ""
    detailed_caption: str = ""


@dataclass
class Description:
    """Step 1's answer: a global caption and the objects."""

    caption: str
    objects: list[ObjectInfo]


@dataclass
class Detection:
    """Step 2's answer for one phrase: box (x0, y0, x1, y1), bool (H, W) mask, detector score."""

    box: list[float]
    mask: np.ndarray
    score: float


@dataclass
class Replacement:
    """The object that replaces another in a ``replace`` edit."""

    name: str
    detailed_caption: str


@dataclass
class EditRequest:
    """One inpainting job of step 3 (``remove`` or ``replace``) for object ``k`` of an image."""

    task: str
    k: int
    class_origin: str
    class_target: str
    prompt: str
    seed: int


@dataclass
class Rewrite:
    """Step 4's answer: a simple rephrasing and one or more reasoning instructions."""

    simple: str
    reasoning: list[str]


class Captioner(Protocol):
    """Step 1."""

    def setup(self, device: str) -> None:
        """Load weights (if any) onto ``device``."""

    def describe(self, image_id: str, image: Image.Image) -> Description:
        """Caption the image and list its objects."""
        ...


class Segmenter(Protocol):
    """Step 2."""

    def setup(self, device: str) -> None:
        """Load weights (if any) onto ``device``."""

    def segment(self, image_id: str, image: Image.Image, names: list[str]) -> list[Detection | None]:
        """One detection (or ``None`` when not found) per object name."""
        ...


class Replacer(Protocol):
    """Step 3: picks the object a ``replace`` edit puts in."""

    def setup(self, device: str) -> None:
        """Load weights (if any) onto ``device``."""

    def replacement(self, image_id: str, image: Image.Image, obj: ObjectInfo, caption: str) -> Replacement:
        """A different object for the place of ``obj``."""
        ...


class Inpainter(Protocol):
    """Step 3: mask-based editing."""

    def setup(self, device: str) -> None:
        """Load weights (if any) onto ``device``."""

    def inpaint(
        self, image_id: str, image: Image.Image, mask: np.ndarray, request: EditRequest
    ) -> tuple[Image.Image, np.ndarray]:
        """The edited image (same size) and the bool (H, W) region it was allowed to change."""
        ...


class Rewriter(Protocol):
    """Step 4."""

    def setup(self, device: str) -> None:
        """Load weights (if any) onto ``device``."""

    def rewrite(self, image_id: str, record: dict[str, Any]) -> Rewrite:
        """Simple and reasoning versions of a record's templated instruction."""
        ...
