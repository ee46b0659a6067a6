"""Synthetic AdvancedEdit: rendered scenes written as remove/add/replace records in the official layout.

For every object ``k`` (1-based) of every scene: a remove record and its add twin (edited image
``{id}_{k}_{colour}_{shape}.png``), and a replace record and its reverse twin (edited image
``{id}_{k}_{a}_to_{b}.png``), with exact masks (checked: mask == pixels where source and target
differ), exact targets, captions, templated instructions and two reasoning instructions that name
the object through the scene ("the object that is the same colour as the largest one"). Path fields
are blank, as in the official release; the naming rule resolves them. See :mod:`.scenes` for the
exactness argument. Output is byte-identical for a seed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from insightedit.data.records import encode_mask
from insightedit.data.scenes import COLOURS, SHAPES, Scene, SceneObject, random_scene, to_image, where

LIKE: dict[str, str] = {
    "red": "a ripe tomato",
    "green": "fresh grass",
    "blue": "the deep sea",
    "yellow": "a banana",
    "purple": "a grape",
}
CORNERS: dict[str, str] = {
    "circle": "the round object",
    "square": "the object with four corners",
    "triangle": "the object with three corners",
}
SYNTH_META = "synthetic.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SynthConfig:
    """What ``insightedit data synth`` draws: image count, side in pixels, seed, objects per scene."""

    num_images: int = 2000
    size: int = 64
    seed: int = 0
    max_objects: int = 3


def _unique(scene: Scene, index: int, test: Any) -> bool:
    """Whether ``test`` holds for object ``index`` and for no other object of ``scene``."""
    return all(bool(test(o)) == (i == index) for i, o in enumerate(scene.objects))


def short_name(scene: Scene, index: int) -> str:
    """The shortest plain name that singles out an object: ``the square`` or ``the red square``."""
    obj = scene.objects[index]
    if _unique(scene, index, lambda o: o.shape == obj.shape):
        return f"the {obj.shape}"
    return f"the {obj.name}"


def referring_expressions(scene: Scene, index: int) -> list[str]:
    """Descriptions that pick object ``index`` of ``scene`` only by reasoning about the scene."""
    obj, objects = scene.objects[index], scene.objects
    areas = [int(o.mask(scene.size).sum()) for o in objects]
    found: list[str] = []
    if len(objects) == 1:
        return ["the only object in the picture", f"the object {where(obj, scene.size)}"]
    others = [a for i, a in enumerate(areas) if i != index]
    if areas[index] > 1.2 * max(others):
        found.append("the largest object")
    if areas[index] * 1.2 < min(others):
        found.append("the smallest object")
    xs = [o.x for i, o in enumerate(objects) if i != index]
    ys = [o.y for i, o in enumerate(objects) if i != index]
    if obj.x + 2 < min(xs):
        found.append("the leftmost object")
    if obj.x - 2 > max(xs):
        found.append("the rightmost object")
    if obj.y + 2 < min(ys):
        found.append("the object nearest the top")
    if obj.y - 2 > max(ys):
        found.append("the lowest object")
    if _unique(scene, index, lambda o: o.shape == obj.shape):
        found.append(CORNERS[obj.shape])
    if _unique(scene, index, lambda o: o.colour == obj.colour):
        found.append(f"the object the colour of {LIKE[obj.colour]}")
    other_colours = {o.colour for i, o in enumerate(objects) if i != index}
    if len(other_colours) == 1 and obj.colour not in other_colours:
        found.append(f"the object that is not {other_colours.pop()}")
    for j, anchor in enumerate(objects):
        if j == index:
            continue
        same_colour = [i for i, o in enumerate(objects) if i != j and o.colour == anchor.colour]
        if same_colour == [index]:
            anchor_name = "the largest one" if areas[j] > 1.2 * max(a for i, a in enumerate(areas) if i != j) else None
            found.append(f"the object that is the same colour as {anchor_name or short_name(scene, j)}")
        same_shape = [i for i, o in enumerate(objects) if i != j and o.shape == anchor.shape]
        if same_shape == [index]:
            found.append(f"the object with the same shape as the {anchor.colour} one")
    return found


def relation(obj: SceneObject, anchor: SceneObject) -> str:
    """Where ``obj`` lies from ``anchor``: ``to the left of``, ``above``, ..."""
    dx, dy = obj.x - anchor.x, obj.y - anchor.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _pick(rng: np.random.Generator, options: list[str], count: int) -> list[str]:
    """``count`` distinct options in a seeded order (repeating when there are fewer)."""
    order = [options[i] for i in rng.permutation(len(options))]
    return [order[i % len(order)] for i in range(count)]


def _remove_texts(scene: Scene, index: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    obj = scene.objects[index]
    refs = referring_expressions(scene, index) or [f"the {obj.name} {where(obj, scene.size)}"]
    a, b = _pick(rng, refs, 2)
    return [f"remove the {obj.name}"], [f"Remove {a}.", f"Can you find {b}? Take it out of the picture."]


def _add_texts(scene: Scene, index: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Phrasings of adding object ``index`` of ``scene`` back into the scene without it."""
    obj, rest = scene.objects[index], scene.without(index)
    place = where(obj, scene.size)
    templated = [f"add a {obj.name} {place}"]
    if not rest.objects:
        return templated, [
            f"Put a {obj.shape} the colour of {LIKE[obj.colour]} {place}.",
            f"Add a {obj.name} {place}.",
        ]
    anchors = [(relation(obj, o), short_name(rest, j)) for j, o in enumerate(rest.objects)]
    (rel_a, name_a), (rel_b, name_b) = (anchors[i % len(anchors)] for i in rng.permutation(max(2, len(anchors)))[:2])
    return templated, [
        f"Add a {obj.name} {rel_a} {name_a}.",
        f"Put a {obj.shape} the colour of {LIKE[obj.colour]} {rel_b} {name_b}.",
    ]


def _replace_texts(scene: Scene, index: int, new: SceneObject, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    old = scene.objects[index]
    refs = referring_expressions(scene, index) or [f"the {old.name} {where(old, scene.size)}"]
    a, b = _pick(rng, refs, 2)
    templated = [f"change the {old.name} to {new.name}", f"replace the {old.name} with {new.name}"]
    if new.shape == old.shape:
        second = f"Paint {b} the colour of {LIKE[new.colour]}."
    else:
        second = f"Find {b} and make it a {new.shape} the colour of {LIKE[new.colour]}."
    return templated, [f"Turn {a} into a {new.name}.", second]


def _replacement(scene: Scene, index: int, rng: np.random.Generator) -> SceneObject:
    """A new object at the same place and size: a different colour, and half the time a different shape."""
    old = scene.objects[index]
    taken = {o.name for o in scene.objects}
    shapes = [old.shape] if rng.random() < 0.5 else [s for s in SHAPES if s != old.shape]
    options = [(s, c) for s in shapes for c in COLOURS if c != old.colour and f"{c} {s}" not in taken]
    shape, colour = options[int(rng.integers(len(options)))]
    return SceneObject(shape, colour, old.x, old.y, old.radius)


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]


def _exact_mask(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """RLE of ``mask`` after checking it equals the pixels where source and target differ."""
    if not np.array_equal(np.any(source != target, axis=-1), mask):
        raise AssertionError("synthetic mask differs from the changed pixels")
    return encode_mask(mask)


def _record(task: str, instructions: tuple[list[str], list[str]], **fields: Any) -> dict[str, Any]:
    templated, reasoning = instructions
    return {
        "target_img_path": "",
        "origin_img_path": "",
        "instruction": templated,
        "task_type": task,
        **fields,
        "reasoning_instruction1": reasoning[0],
        "reasoning_instruction2": reasoning[1],
    }


def write_image_records(out: Path, image_id: str, scene: Scene, rng: np.random.Generator) -> int:
    """Render ``scene`` and all its edits under ``out``; return the number of records written."""
    size, source = scene.size, scene.render()
    remove_add: dict[str, Any] = {}
    replace: dict[str, Any] = {}
    to_image(source).save(out / "0_source_img" / f"{image_id}.png")
    for index, obj in enumerate(scene.objects):
        k, mask = index + 1, obj.mask(size)
        removed_scene = scene.without(index)
        removed = removed_scene.render()
        name = obj.name.replace(" ", "_")
        to_image(removed).save(
            out / "3_editing_pair_construction/remove_add/target_imgs" / f"{image_id}_{k}_{name}.png"
        )
        rle, box = _exact_mask(source, removed, mask), _bbox(mask)
        detail = f"a {obj.name} {where(obj, size)}"
        common = {"detailed_caption": detail, "bbox": box, "segmentation": rle}
        remove_add[str(len(remove_add))] = _record(
            "remove", _remove_texts(scene, index, rng), img_caption=scene.caption(), class_origin=name,
            class_target="", target_caption=removed_scene.caption(), **common,
        )  # fmt: skip
        remove_add[str(len(remove_add))] = _record(
            "add", _add_texts(scene, index, rng), img_caption=scene.caption(), class_origin="",
            class_target=name, target_caption=scene.caption(), **common,
        )  # fmt: skip
        new = _replacement(scene, index, rng)
        swapped_scene = scene.swapped(index, new)
        swapped = swapped_scene.render()
        edited = f"{image_id}_{k}_{name}_to_{new.name.replace(' ', '_')}.png"
        to_image(swapped).save(out / "3_editing_pair_construction/replace/target_imgs" / edited)
        union = mask | new.mask(size)
        rle, box = _exact_mask(source, swapped, union), _bbox(union)
        new_detail = f"a {new.name} {where(new, size)}"
        for forward in (True, False):
            before, after = (scene, swapped_scene) if forward else (swapped_scene, scene)
            a, b = (obj, new) if forward else (new, obj)
            replace[str(len(replace))] = _record(
                "replace", _replace_texts(before, index, b, rng), detailed_caption=detail,
                img_caption=scene.caption(), class_origin=a.name, class_target=b.name,
                detailed_caption_origin=detail if forward else new_detail,
                detailed_caption_target=new_detail if forward else detail,
                target_caption=after.caption(), source_caption=before.caption(), bbox=box, segmentation=rle,
            )  # fmt: skip
    for group, records in (("remove_add", remove_add), ("replace", replace)):
        if records:
            text = json.dumps(records, indent=2, sort_keys=False) + "\n"
            (out / "4_instruction_recaption" / group / f"{image_id}.json").write_text(text, encoding="utf-8")
    return len(remove_add) + len(replace)


def synthesize(out: str | Path, config: SynthConfig) -> dict[str, Any]:
    """Write a synthetic AdvancedEdit dataset to ``out`` (must be empty or absent); return a summary."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    if config.num_images < 1 or config.size < 16:
        raise ValueError("synthetic data needs num_images >= 1 and size >= 16")
    for folder in (
        "0_source_img", "3_editing_pair_construction/remove_add/target_imgs",
        "3_editing_pair_construction/replace/target_imgs", "4_instruction_recaption/remove_add",
        "4_instruction_recaption/replace",
    ):  # fmt: skip
        (out / folder).mkdir(parents=True, exist_ok=True)
    start, records = time.perf_counter(), 0
    for number in range(config.num_images):
        rng = np.random.default_rng([config.seed, number])
        scene = random_scene(rng, config.size, config.max_objects)
        records += write_image_records(out, f"{number:06d}", scene, rng)
    meta = {"format_version": FORMAT_VERSION, **config.__dict__, "records": records}
    (out / SYNTH_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {**meta, "seconds": round(time.perf_counter() - start, 2)}


def ensure_synthetic(root: str | Path, config: SynthConfig) -> Path:
    """Generate the dataset at ``root`` unless the same one is cached there; return ``root``.

    Generation goes to a temporary sibling that is renamed into place, so an interrupted or
    concurrent run never leaves a half-written dataset behind.
    """
    root = Path(root)
    meta_path = root / SYNTH_META
    wanted = {"format_version": FORMAT_VERSION, **config.__dict__}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if {k: meta.get(k) for k in wanted} == wanted:
            return root
        raise FileExistsError(f"{root} holds synthetic data made with other settings ({meta_path})")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no {SYNTH_META}")
    tmp = root.with_name(f".{root.name}.tmp-{time.time_ns()}")
    try:
        synthesize(tmp, config)
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            root.rmdir()
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
