"""Questions about a synthetic scene with short exact answers: the tiny MLLM's instruction-tuning data.

Every question is asked only where its answer is unambiguous to a viewer of the image, with margins in
pixels: a size question needs the answer's area 1.2x beyond every other's, a relation question needs
every object's offset from the anchor to lean clearly to one axis, a place question needs the centre 2
pixels inside its cell of the 3x3 grid, a colour question a shape that occurs once. Answers are short
phrases of the scene vocabulary (``red circle``, ``in the top left``, ``3``); the ``rewrite`` task
turns a reasoning phrasing of an edit (made by :mod:`insightedit.data.synthetic`, as in the editing
data) into its templated, explicit instruction. ``caption`` is the alignment task (LLaVA's stage 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from insightedit.data.scenes import Scene, SceneObject, where
from insightedit.data.synthetic import _remove_texts, _replace_texts, _replacement, relation, short_name

QUESTION_KINDS: tuple[str, ...] = ("smallest", "largest", "left_of", "above", "colour", "count", "where", "rewrite")
CAPTION_KIND = "caption"
SIZE_MARGIN = 1.2  # the answer's area beyond every other object's by this factor
AXIS_MARGIN = 2  # pixels by which a relation's axis must dominate the other axis
CELL_MARGIN = 2  # pixels between an object's centre and the border of its 3x3 cell

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "smallest": ("Which object is the smallest?", "What is the smallest object?"),
    "largest": ("Which object is the largest?", "What is the biggest object?"),
    "left_of": ("What is to the left of {name}?", "Which object is left of {name}?"),
    "above": ("What is above {name}?", "Which object is above {name}?"),
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?"),
    "count": ("How many objects are there?", "How many objects are in the picture?"),
    "where": ("Where is {name}?", "Where is {name} in the image?"),
    "rewrite": ("Rewrite this instruction explicitly: {instruction}", "Say explicitly: {instruction}"),
    CAPTION_KIND: ("Describe the image.", "What is in the image?"),
}


@dataclass(frozen=True)
class Question:
    """One question about a scene, its exact answer and its kind (one of :data:`QUESTION_KINDS` or caption)."""

    kind: str
    question: str
    answer: str


def _areas(scene: Scene) -> list[int]:
    return [int(obj.mask(scene.size).sum()) for obj in scene.objects]


def _extreme(scene: Scene, rng: np.random.Generator, kind: str) -> Question | None:
    """The smallest or largest object, when its area is beyond every other's by :data:`SIZE_MARGIN`."""
    if len(scene.objects) < 2:
        return None
    areas = _areas(scene)
    order = sorted(range(len(areas)), key=areas.__getitem__)
    first, second = (order[0], order[1]) if kind == "smallest" else (order[-1], order[-2])
    small, big = sorted((areas[first], areas[second]))
    if big < SIZE_MARGIN * small:
        return None
    return Question(kind, _template(rng, kind), scene.objects[first].name)


def _clear_relation(obj: SceneObject, anchor: SceneObject) -> str | None:
    """``relation(obj, anchor)`` when one axis dominates by :data:`AXIS_MARGIN` pixels, else ``None``."""
    dx, dy = abs(obj.x - anchor.x), abs(obj.y - anchor.y)
    return relation(obj, anchor) if abs(dx - dy) > AXIS_MARGIN else None


def _related(scene: Scene, rng: np.random.Generator, kind: str) -> Question | None:
    """What is to the left of / above an anchor: exactly one object, every relation clear."""
    wanted = "to the left of" if kind == "left_of" else "above"
    options = []
    for j, anchor in enumerate(scene.objects):
        relations = [_clear_relation(o, anchor) for i, o in enumerate(scene.objects) if i != j]
        if None in relations or relations.count(wanted) != 1:
            continue
        answer = next(o for i, o in enumerate(scene.objects) if i != j and relation(o, anchor) == wanted)
        options.append((j, answer))
    if not options:
        return None
    j, answer = options[int(rng.integers(len(options)))]
    return Question(kind, _template(rng, kind, name=_name(scene, j, rng)), answer.name)


def _colour(scene: Scene, rng: np.random.Generator) -> Question | None:
    """The colour of a shape that occurs once."""
    shapes = [o.shape for o in scene.objects]
    unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
    if not unique:
        return None
    obj = unique[int(rng.integers(len(unique)))]
    return Question("colour", _template(rng, "colour", shape=obj.shape), obj.colour)


def _count(scene: Scene, rng: np.random.Generator) -> Question | None:
    return Question("count", _template(rng, "count"), str(len(scene.objects)))


def _clear_place(obj: SceneObject, size: int) -> bool:
    """Whether the centre lies :data:`CELL_MARGIN` pixels inside its cell of the 3x3 grid."""
    cell = size / 3
    return all(min(v % cell, cell - v % cell) >= CELL_MARGIN for v in (obj.x, obj.y))


def _where(scene: Scene, rng: np.random.Generator) -> Question | None:
    """Where an object is (:func:`insightedit.data.scenes.where`), when its centre is clear of the cell borders."""
    clear = [i for i, o in enumerate(scene.objects) if _clear_place(o, scene.size)]
    if not clear:
        return None
    index = clear[int(rng.integers(len(clear)))]
    obj = scene.objects[index]
    return Question("where", _template(rng, "where", name=_name(scene, index, rng)), where(obj, scene.size))


def _rewrite(scene: Scene, rng: np.random.Generator) -> Question | None:
    """A reasoning phrasing of removing or replacing an object -> its templated instruction.

    Only phrasings that single the object out by reasoning are used (not the fallback that names it).
    """
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    fallback = f"the {obj.name} {where(obj, scene.size)}"
    if rng.random() < 0.5:
        templated, reasoning = _remove_texts(scene, index, rng)
    else:
        templated, reasoning = _replace_texts(scene, index, _replacement(scene, index, rng), rng)
    phrasing = reasoning[int(rng.integers(len(reasoning)))]
    if fallback in phrasing:
        return None
    return Question("rewrite", _template(rng, "rewrite", instruction=phrasing), templated[0])


def _name(scene: Scene, index: int, rng: np.random.Generator) -> str:
    """``the square`` (when it singles the object out) or ``the red square``, chosen at random."""
    return short_name(scene, index) if rng.random() < 0.5 else f"the {scene.objects[index].name}"


def _template(rng: np.random.Generator, kind: str, **fields: str) -> str:
    options = _TEMPLATES[kind]
    return options[int(rng.integers(len(options)))].format(**fields)


_MAKERS: dict[str, Callable[[Scene, np.random.Generator], Question | None]] = {
    "smallest": lambda s, r: _extreme(s, r, "smallest"),
    "largest": lambda s, r: _extreme(s, r, "largest"),
    "left_of": lambda s, r: _related(s, r, "left_of"),
    "above": lambda s, r: _related(s, r, "above"),
    "colour": _colour,
    "count": _count,
    "where": _where,
    "rewrite": _rewrite,
}


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    """A question of ``kind`` about ``scene`` with its answer, or ``None`` where the scene cannot answer it."""
    if kind == CAPTION_KIND:
        return Question(CAPTION_KIND, _template(rng, CAPTION_KIND), scene_caption(scene, rng))
    if kind not in _MAKERS:
        raise ValueError(f"kind must be one of {(*QUESTION_KINDS, CAPTION_KIND)}, got {kind!r}")
    if not scene.objects:
        return None
    return _MAKERS[kind](scene, rng)


def questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """One question of every kind the scene can answer (in :data:`QUESTION_KINDS` order)."""
    asked = (ask(scene, kind, rng) for kind in QUESTION_KINDS)
    return [q for q in asked if q is not None]


def scene_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The scene's caption: one of the CLIP foundation's phrasings where they exist, else :meth:`Scene.caption`."""
    try:
        from insightedit.data.scene_captions import random_caption
    except ImportError:
        return scene.caption()
    return random_caption(scene, rng)
