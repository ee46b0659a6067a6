"""Oracle backends for synthetic photos: the renderer knows every object, mask and exact edit.

:func:`render_photos` writes the input of a build: ``{id}.png`` plus a sidecar ``{id}.scene.json`` (the
scene: background, objects with shape, colour, centre and radius), the same scenes ``insightedit data
synth`` draws for a seed. The oracle backends read the sidecar by image id and answer every role
exactly: captions and object names from the scene, the rasterised mask of the named object, the
re-rendered scene without it or with a replacement, and instructions built from the scene's
referring expressions. The oracle judge compares pixels: an edit that changed nothing scores 0, so
the filter drops it (``steps.inpaint.noop_every`` makes such edits on purpose). The whole pipeline
thus runs on a CPU and in CI, with exact answers to check against.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from insightedit.data.build.chat import StepFailure
from insightedit.data.build.roles import Description, Detection, EditRequest, ObjectInfo, Replacement, Rewrite
from insightedit.data.scenes import COLOURS, SHAPES, Scene, SceneObject, random_scene, to_image, where
from insightedit.data.synthetic import LIKE, referring_expressions, relation, short_name
from insightedit.image_reader import load_rgb

SCENE_SUFFIX = ".scene.json"


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    """A JSON-ready description of ``scene``."""
    return asdict(scene)


def scene_from_dict(data: dict[str, Any]) -> Scene:
    """The :class:`Scene` of :func:`scene_to_dict`."""
    objects = tuple(SceneObject(**obj) for obj in data["objects"])
    return Scene(int(data["size"]), tuple(data["background"]), str(data["split"]), objects)


def render_photos(out: str | Path, num_images: int, size: int = 64, seed: int = 0, max_objects: int = 3) -> list[Path]:
    """Write ``num_images`` synthetic photos ``{id:06d}.png`` with scene sidecars to ``out``; return the photos."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for number in range(num_images):
        rng = np.random.default_rng([seed, number])  # the same scenes as insightedit data synth
        scene = random_scene(rng, size, max_objects)
        path = out / f"{number:06d}.png"
        to_image(scene.render()).save(path)
        (out / f"{number:06d}{SCENE_SUFFIX}").write_text(json.dumps(scene_to_dict(scene), indent=2) + "\n")
        written.append(path)
    return written


def parse_object_name(name: str) -> tuple[str, str]:
    """``"blue square"`` → (``blue``, ``square``); raise :class:`StepFailure` for a name no scene can hold."""
    parts = name.split()
    if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
        raise StepFailure(f"oracle: {name!r} is not a '<colour> <shape>' of the synthetic scenes")
    return parts[0], parts[1]


class OracleScenes:
    """Scene sidecars of an image folder, by image id."""

    def __init__(self, images: str | Path, delay_s: float = 0.0) -> None:
        self.images = Path(images)
        self.delay_s = delay_s

    def setup(self, device: str) -> None:
        """Nothing to load."""

    def scene(self, image_id: str) -> Scene:
        """The scene of ``image_id``; raise :class:`StepFailure` when its sidecar is missing or malformed."""
        if self.delay_s:
            time.sleep(self.delay_s)
        path = self.images / f"{image_id}{SCENE_SUFFIX}"
        try:
            return scene_from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise StepFailure(f"oracle: no scene sidecar {path.name} (render inputs with render_photos)") from None
        except (ValueError, KeyError, TypeError) as error:
            raise StepFailure(f"oracle: malformed scene sidecar {path.name} ({error})") from None

    def index(self, scene: Scene, name: str) -> int:
        """Index of the object called ``name``; raise :class:`StepFailure`."""
        names = [obj.name for obj in scene.objects]
        if name not in names:
            raise StepFailure(f"oracle: no {name!r} in the scene ({', '.join(names)})")
        return names.index(name)


class OracleCaptioner(OracleScenes):
    """Step 1: the scene's caption and its objects, named ``colour shape``."""

    def describe(self, image_id: str, image: Image.Image) -> Description:
        """Caption and objects of the scene."""
        scene = self.scene(image_id)
        objects = [ObjectInfo(obj.name, obj.shape, f"a {obj.name} {where(obj, scene.size)}") for obj in scene.objects]
        return Description(scene.caption(), objects)


class OracleSegmenter(OracleScenes):
    """Step 2: the exact rasterised mask of each named object."""

    def segment(self, image_id: str, image: Image.Image, names: list[str]) -> list[Detection | None]:
        """The mask of each name (``None`` for a name not in the scene)."""
        scene = self.scene(image_id)
        if image.size != (scene.size, scene.size):
            raise StepFailure(f"oracle: image is {image.size}, its scene {scene.size}px (do not set short_side)")
        found: list[Detection | None] = []
        by_name = {obj.name: obj for obj in scene.objects}
        for name in names:
            obj = by_name.get(name)
            if obj is None:
                found.append(None)
                continue
            mask = obj.mask(scene.size)
            ys, xs = np.nonzero(mask)
            found.append(Detection([float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())], mask, 1.0))
        return found


class OracleReplacer(OracleScenes):
    """Step 3: a ``colour shape`` not in the scene, for the same place; deterministic per image and object."""

    def replacement(self, image_id: str, image: Image.Image, obj: ObjectInfo, caption: str) -> Replacement:
        """A different colour, and for every other object a different shape too."""
        scene = self.scene(image_id)
        old = scene.objects[self.index(scene, obj.name)]
        taken = {o.name for o in scene.objects}
        pick = zlib.crc32(f"{image_id}/{obj.name}".encode())
        shapes = [old.shape] if pick % 2 else [s for s in SHAPES if s != old.shape]
        options = [f"{c} {s}" for s in shapes for c in COLOURS if c != old.colour and f"{c} {s}" not in taken]
        name = options[pick % len(options)]
        new = SceneObject(name.split()[1], name.split()[0], old.x, old.y, old.radius)
        return Replacement(name, f"a {name} {where(new, scene.size)}")


class OracleInpainter(OracleScenes):
    """Step 3: the scene re-rendered without the object (remove) or with the replacement (replace).

    The changed region is the object's mask (remove) or the union of the old and the new shape
    (replace): exactly the pixels that differ. ``noop_every`` > 0 returns the source unchanged for
    every object ``k`` divisible by it: a failed edit.
    """

    def __init__(self, images: str | Path, delay_s: float = 0.0, noop_every: int = 0) -> None:
        super().__init__(images, delay_s)
        self.noop_every = noop_every

    def inpaint(
        self, image_id: str, image: Image.Image, mask: np.ndarray, request: EditRequest
    ) -> tuple[Image.Image, np.ndarray]:
        """The exact edit of ``request``."""
        scene = self.scene(image_id)
        index = self.index(scene, request.class_origin)
        old = scene.objects[index]
        if self.noop_every and request.k % self.noop_every == 0:
            return image.copy(), mask
        if request.task == "remove":
            return to_image(scene.without(index).render()), old.mask(scene.size)
        colour, shape = parse_object_name(request.class_target)
        new = SceneObject(shape, colour, old.x, old.y, old.radius)
        edited = scene.swapped(index, new).render()
        return to_image(edited), old.mask(scene.size) | new.mask(scene.size)


class OracleRewriter(OracleScenes):
    """Step 4: a plain rephrasing and a reasoning instruction built from the scene's referring expressions."""

    def rewrite(self, image_id: str, record: dict[str, Any]) -> Rewrite:
        """Rephrase ``record``'s edit against the scene its source image shows."""
        scene = self.scene(image_id)
        task, origin, target = record["task_type"], record.get("class_origin", ""), record.get("class_target", "")
        names = [obj.name for obj in scene.objects]
        if task == "remove":
            index = self.index(scene, origin)
            return Rewrite(f"Take the {origin} out of the picture.", [f"Remove {self._refer(scene, index)}."])
        if task == "add":
            index = self.index(scene, target)
            obj, rest = scene.objects[index], scene.without(index)
            place, described = where(obj, scene.size), f"a {obj.shape} the colour of {LIKE[obj.colour]}"
            if not rest.objects:
                return Rewrite(f"Put a {target} {place}.", [f"Put {described} {place}."])
            nearest = min(rest.objects, key=lambda o: abs(o.x - obj.x) + abs(o.y - obj.y))
            anchor = rest.objects.index(nearest)
            near = f"{relation(obj, nearest)} {short_name(rest, anchor)}"
            return Rewrite(f"Put a {target} {place}.", [f"Put {described} {near}."])
        if origin in names:  # replace, original -> edited
            index, before = self.index(scene, origin), scene
        else:  # the reverse twin: its source is the edited scene
            index = self.index(scene, target)
            colour, shape = parse_object_name(origin)
            placed = scene.objects[index]
            before = scene.swapped(index, SceneObject(shape, colour, placed.x, placed.y, placed.radius))
        colour, shape = parse_object_name(target)
        return Rewrite(
            f"Make the {origin} a {target}.",
            [f"Turn {self._refer(before, index)} into a {shape} the colour of {LIKE[colour]}."],
        )

    @staticmethod
    def _refer(scene: Scene, index: int) -> str:
        found = referring_expressions(scene, index)
        return found[0] if found else f"the {scene.objects[index].name} {where(scene.objects[index], scene.size)}"


class OracleJudge:
    """A VIEScore judge for exact synthetic edits: it compares the pixels of what it is shown.

    SC: editing success 10 when the edited image differs from the source, else 0; over-editing 10 when
    at most half of the pixels changed, else 5. PQ: 10 and 10 (the renderer draws no artifacts). It
    checks that *something* changed, not that the right thing did: the oracle inpainter is exact by
    construction, so a no-op is its only way to fail.
    """

    name = "oracle"
    max_concurrency = 1

    def ask(self, prompt: str, images: Sequence[bytes]) -> str:
        """A JSON reply in the VIEScore prompts' format."""
        if len(images) == 1:
            return json.dumps({"score": [10, 10], "reasoning": "rendered scene"})
        source, edited = (np.asarray(load_rgb(data, name="judged image").image) for data in images[:2])
        if source.shape != edited.shape:
            return json.dumps({"score": [0, 0], "reasoning": "sizes differ"})
        changed = float(np.any(source != edited, axis=-1).mean())
        scores = [10 if changed > 0 else 0, 10 if changed <= 0.5 else 5]
        return json.dumps({"score": scores, "reasoning": f"{changed:.1%} of the pixels changed"})
