"""Captions of a synthetic :class:`~insightedit.data.scenes.Scene` for contrastive (CLIP) pretraining.

Every phrasing names every object of the scene by colour and shape, so a caption describes the whole
scene; the phrasings differ in what they add: sizes (``small`` / ``large`` from the radius, or ``the
largest``), coarse positions (:func:`~insightedit.data.scenes.where`), a relation between two objects
(``left of``, ``above``, ...) and the background. The tiny twin's tokenizer is character-level (one token
per non-space character, 77 with the start and end tokens), so a phrasing that would be cut is dropped
(first without its background, then altogether); the plain listing always fits. Output is a pure
function of the scene and the random generator given.
"""

from __future__ import annotations

import itertools

import numpy as np

from insightedit.data.scenes import Scene, SceneObject, where

MAX_TOKENS = 77  # the text tower's context: start + characters + end
PHRASINGS: tuple[str, ...] = ("plain", "sizes", "positions", "relation", "largest")


def token_count(text: str) -> int:
    """Tokens the character-level CLIP tokenizer gives ``text``: one per non-space character, + start and end."""
    return len("".join(text.split())) + 2


def size_word(obj: SceneObject, size: int) -> str:
    """``small`` or ``large``: the radius against the middle of the range :func:`random_scene` draws from."""
    low, high = max(2, round(size * 0.07)), max(3, round(size * 0.16))
    return "small" if 2 * obj.radius <= low + high else "large"


def relation_word(obj: SceneObject, anchor: SceneObject) -> str:
    """Where ``obj`` lies from ``anchor`` (the axis they differ most along): ``left of``, ``above``, ..."""
    dx, dy = obj.x - anchor.x, obj.y - anchor.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def largest_index(scene: Scene) -> int | None:
    """The object whose mask is over 1.2 times every other's area, if there is one (and more than one object)."""
    if len(scene.objects) < 2:
        return None
    areas = [int(o.mask(scene.size).sum()) for o in scene.objects]
    best = int(np.argmax(areas))
    if all(areas[best] > 1.2 * a for i, a in enumerate(areas) if i != best):
        return best
    return None


def _listing(parts: list[str]) -> str:
    """``x``, ``x and y``, ``x, y and z``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background(scene: Scene) -> str:
    return f"on {scene.background_name()}"


def _body(scene: Scene, phrasing: str, order: list[int]) -> str | None:
    """The phrasing's text without the background, or ``None`` where it does not apply to the scene."""
    objects = [scene.objects[i] for i in order]
    if phrasing == "plain":
        return _listing([f"a {o.name}" for o in objects])
    if phrasing == "sizes":
        return _listing([f"a {size_word(o, scene.size)} {o.name}" for o in objects])
    if phrasing == "positions":
        return _listing([f"a {o.name} {where(o, scene.size)}" for o in objects])
    if phrasing == "relation":
        if len(objects) < 2:
            return None
        first, second, *rest = objects
        text = f"a {first.name} {relation_word(first, second)} a {second.name}"
        return text + "".join(f" and a {o.name}" for o in rest)
    if phrasing == "largest":
        best = largest_index(scene)
        if best is None:
            return None
        others = [f"a {scene.objects[i].name}" for i in order if i != best]
        return f"the {scene.objects[best].name} is the largest, beside {_listing(others)}"
    raise ValueError(f"unknown phrasing {phrasing!r}; choose one of {PHRASINGS}")


def _fitting(scene: Scene, phrasing: str, order: list[int]) -> str | None:
    """The phrasing with its background if that fits the tokenizer, else without, else ``None``."""
    body = _body(scene, phrasing, order)
    if body is None:
        return None
    fitting = [t for t in (f"{body} {_background(scene)}", body) if token_count(t) <= MAX_TOKENS]
    if not fitting and phrasing == "plain":  # three objects with the longest names fit; a changed world may not
        raise ValueError(f"the plain caption of {len(scene.objects)} objects is over {MAX_TOKENS} tokens")
    return fitting[0] if fitting else None


def _left_to_right(scene: Scene) -> list[int]:
    return sorted(range(len(scene.objects)), key=lambda i: (scene.objects[i].x, scene.objects[i].y))


def scene_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Every phrasing of ``scene`` that fits the tokenizer, objects in an order drawn from ``rng``.

    The plain listing comes first and is always there. An empty scene has one caption.
    """
    if not scene.objects:
        return [f"an empty {scene.background_name()} background"]
    captions: list[str] = []
    for phrasing in PHRASINGS:
        if phrasing in ("positions", "plain"):
            order = _left_to_right(scene)
        else:
            order = [int(i) for i in rng.permutation(len(scene.objects))]
        text = _fitting(scene, phrasing, order)
        if text is not None:
            captions.append(text)
    return captions


def true_captions(scene: Scene) -> set[str]:
    """Every caption :func:`scene_captions` could give ``scene``, whatever the drawn object order.

    A caption in this set is true of the scene's image, so retrieval may count it as right for it.
    """
    if not scene.objects:
        return {f"an empty {scene.background_name()} background"}
    found: set[str] = set()
    for phrasing in PHRASINGS:
        orders = [_left_to_right(scene)] if phrasing in ("positions", "plain") else itertools.permutations(
            range(len(scene.objects))
        )  # fmt: skip
        for order in orders:
            text = _fitting(scene, phrasing, list(order))
            if text is not None:
                found.add(text)
    return found


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of :func:`scene_captions`, drawn uniformly with ``rng``."""
    captions = scene_captions(scene, rng)
    return captions[int(rng.integers(len(captions)))]
