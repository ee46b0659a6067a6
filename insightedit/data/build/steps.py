"""The five steps, each ``process(image_id)`` for one image: read the previous step's files, write its own.

1. caption: the source is decoded (EXIF, modes fixed), optionally resized, stored as ``0_source_img/{id}.png``;
   an MLLM writes the global caption and the object list;
2. segment: a mask per object (Grounding DINO box → SAM mask, or the oracle's exact mask) as COCO RLE;
3. inpaint: per object ``k`` a ``remove`` edit (its reverse is the ``add`` record) and a ``replace`` edit
   with an object chosen by the chat backend (plus its reverse), targets ``{id}_{k}_{class}.png`` and
   ``{id}_{k}_{class}_to_{new}.png``;
4. rewrite: a simple and a reasoning version of each templated instruction;
5. filter: VIEScore (SC on source + target + instruction, PQ on the target) with the judge; a record
   passes when O/10 >= the threshold. Scores are kept 0–10 in ``viescore`` and halved to the release's
   0–5 in ``qwen_VIE_SC`` / ``qwen_VIE_PQ``.

A step raises :class:`~insightedit.data.build.chat.StepFailure` for a bad image; the runner records it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from insightedit.data.advancededit import slug
from insightedit.data.build.chat import JsonChat, StepFailure, make_chat
from insightedit.data.build.config import BuildConfig, ChatSpec
from insightedit.data.build.oracle import (
    OracleCaptioner,
    OracleInpainter,
    OracleJudge,
    OracleReplacer,
    OracleRewriter,
    OracleSegmenter,
)
from insightedit.data.build.prompts import ChatCaptioner, ChatReplacer, ChatRewriter
from insightedit.data.build.roles import EditRequest, ObjectInfo
from insightedit.data.build.store import GROUPS, BuildStore, atomic_write_json, atomic_write_png, read_json
from insightedit.data.images import BadSample, load_rgb
from insightedit.data.records import decode_mask, encode_mask
from insightedit.evaluation.viescore.cache import ReplyCache
from insightedit.evaluation.viescore.scorer import VIEScoreItem, VIEScorer


@dataclass
class BuildContext:
    """What every step shares: the config, the output store, the input images by id, the reply cache.

    ``retry_failed``: chat replies that could not be used are asked again instead of replayed from the cache.
    """

    config: BuildConfig
    store: BuildStore
    images: dict[str, Path]
    images_root: Path
    cache: ReplyCache
    retry_failed: bool = False


@dataclass
class StepResult:
    """Files a step wrote for one image and what to note in its commit marker."""

    files: list[Path]
    info: dict[str, Any] = field(default_factory=dict)


def _json_chat(spec: ChatSpec, context: BuildContext, device: str) -> JsonChat:
    return JsonChat(make_chat(spec, device), context.cache, spec.parse_retries, context.retry_failed)


def _read(path: Path) -> Image.Image:
    """An image by the package's one reader; an unreadable one fails the image (:class:`StepFailure`)."""
    try:
        return load_rgb(path).image
    except BadSample as error:
        raise StepFailure(str(error)) from None


def _load_source(context: BuildContext, image_id: str) -> Image.Image:
    return _read(context.store.source(image_id))


def bbox_xywh(mask: np.ndarray) -> list[int]:
    """[x, y, w, h] of a non-empty bool mask, as the AdvancedEdit records store it."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]


def _region_fields(region: np.ndarray) -> dict[str, Any]:
    """``bbox`` and ``segmentation`` (COCO RLE) of the region an edit changed."""
    return {"bbox": bbox_xywh(region), "segmentation": encode_mask(region)}


def place_phrase(mask: np.ndarray) -> str:
    """A coarse 3x3 location of a mask's centre (``in the top left``, ``in the centre``)."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    row = ("top", "middle", "bottom")[min(2, int(ys.mean() * 3 // height))]
    col = ("left", "centre", "right")[min(2, int(xs.mean() * 3 // width))]
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"in the {row} {col}"


class Step:
    """One step: ``setup`` builds its backends on the predict job's device, ``process`` handles one image."""

    number = 0
    name = ""

    def __init__(self, context: BuildContext) -> None:
        self.context = context

    @property
    def concurrency(self) -> int:
        """Images handled at once per rank (API backends: their ``concurrency``; local models: 1)."""
        return 1

    def setup(self, device: str) -> None:
        """Build the backends (load weights onto ``device``)."""

    def teardown(self) -> None:
        """Free the backends (weights) before the next step loads its own."""
        for name in ("captioner", "segmenter", "replacer", "inpainter", "rewriter", "scorer"):
            self.__dict__.pop(name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def process(self, image_id: str) -> StepResult:
        """Run the step for one image; raise :class:`StepFailure` with the reason."""
        raise NotImplementedError


class CaptionStep(Step):
    """Step 1: store the source, caption it and list its objects."""

    number, name = 1, "caption"

    @property
    def concurrency(self) -> int:
        """The API's concurrency for ``openai``, else 1."""
        spec = self.context.config.steps.caption
        return spec.concurrency if spec.backend == "openai" else 1

    def setup(self, device: str) -> None:
        """The oracle or a chat captioner."""
        spec, config = self.context.config.steps.caption, self.context.config
        if spec.backend == "oracle":
            self.captioner: Any = OracleCaptioner(self.context.images_root, spec.delay_s)
        else:
            chat = _json_chat(spec.chat_spec(), self.context, device)
            self.captioner = ChatCaptioner(chat, spec.max_objects, config.chat_image_side)

    def process(self, image_id: str) -> StepResult:
        """Decode, store, describe."""
        store, short_side = self.context.store, self.context.config.short_side
        image = _read(self.context.images[image_id])
        if short_side and min(image.size) != short_side:
            scale = short_side / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BICUBIC)  # fmt: skip
        source = store.source(image_id)
        atomic_write_png(source, image)
        description = self.captioner.describe(image_id, image)
        objects = [
            {"category": o.category, "obj_simple_caption": o.name, "obj_detailed_caption": o.detailed_caption}
            for o in description.objects
        ]
        atomic_write_json(
            store.recaption(image_id), {"img_path": store.relative(source), "caption": description.caption}
        )
        atomic_write_json(store.objects(image_id), {"object_list": objects, "img_caption": description.caption})
        return StepResult([source, store.recaption(image_id), store.objects(image_id)], {"objects": len(objects)})


class SegmentStep(Step):
    """Step 2: a COCO-RLE mask per listed object."""

    number, name = 2, "segment"

    def setup(self, device: str) -> None:
        """The oracle or GroundedSAM."""
        spec = self.context.config.steps.segment
        if spec.backend == "oracle":
            self.segmenter: Any = OracleSegmenter(self.context.images_root, spec.delay_s)
        else:
            from insightedit.data.build.models import GroundedSAM

            self.segmenter = GroundedSAM(spec)
        self.segmenter.setup(device)

    def process(self, image_id: str) -> StepResult:
        """Detect and segment every object of step 1's list; objects without a mask are left out."""
        store = self.context.store
        image = _load_source(self.context, image_id)
        listed = read_json(store.objects(image_id))
        objects = listed["object_list"]
        detections = self.segmenter.segment(image_id, image, [o["obj_simple_caption"] for o in objects])
        annotations, seen = [], set()
        for obj, found in zip(objects, detections, strict=True):
            if found is None or not found.mask.any():
                continue
            rle = encode_mask(found.mask)
            if rle["counts"] in seen:  # two phrases grounded to the same object
                continue
            seen.add(rle["counts"])
            annotations.append({
                "class_name": obj["obj_simple_caption"], "detailed_caption": obj["obj_detailed_caption"],
                "bbox": [round(v, 2) for v in found.box], "segmentation": rle, "score": [round(found.score, 4)],
            })  # fmt: skip
        atomic_write_json(store.masks(image_id), {
            "image_path": store.relative(store.source(image_id)), "img_caption": listed["img_caption"],
            "annotations": annotations, "box_format": "xyxy", "img_width": image.width, "img_height": image.height,
        })  # fmt: skip
        return StepResult([store.masks(image_id)], {"objects": len(objects), "masks": len(annotations)})


class InpaintStep(Step):
    """Step 3: remove / add / replace edits of every segmented object."""

    number, name = 3, "inpaint"

    def setup(self, device: str) -> None:
        """The replacement chooser (``inpaint.chat``, default step 1's backend) and the inpainter."""
        config, root = self.context.config, self.context.images_root
        spec = config.steps.inpaint
        chat = spec.chat or config.steps.caption.chat_spec()
        if chat.backend == "oracle":
            self.replacer: Any = OracleReplacer(root, chat.delay_s)
        else:
            self.replacer = ChatReplacer(_json_chat(chat, self.context, device))
        if spec.backend == "oracle":
            self.inpainter: Any = OracleInpainter(root, spec.delay_s, spec.noop_every)
        else:
            from insightedit.data.build.models import DiffusersInpainter

            self.inpainter = DiffusersInpainter(spec)
        self.inpainter.setup(device)

    def _seed(self, image_id: str, k: int, task: str) -> int:
        return zlib.crc32(f"{self.context.config.seed}/{image_id}/{k}/{task}".encode())

    def process(self, image_id: str) -> StepResult:
        """Plan the replacements and file names, then inpaint and write targets and records."""
        store, spec = self.context.store, self.context.config.steps.inpaint
        image = _load_source(self.context, image_id)
        masks = read_json(store.masks(image_id))
        caption, source = masks["img_caption"], store.relative(store.source(image_id))
        plan = []
        for k, ann in enumerate(masks["annotations"], start=1):
            name, detail = ann["class_name"], ann.get("detailed_caption", "")
            new = self.replacer.replacement(image_id, image, ObjectInfo(name, "", detail), caption)
            removed = store.target("remove_add", f"{image_id}_{k}_{slug(name)}.png")
            replaced = store.target("replace", f"{image_id}_{k}_{slug(name)}_to_{slug(new.name)}.png")
            plan.append((k, ann, new, removed, replaced))
        record_files = [store.records(3, group, image_id) for group in GROUPS]
        planned = [path for *_, removed, replaced in plan for path in (removed, replaced)] + record_files
        store.begin(3, image_id, planned)
        groups: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        written: list[Path] = []
        for k, ann, new, removed_path, replaced_path in plan:
            name, detail = ann["class_name"], ann.get("detailed_caption", "")
            mask = decode_mask(ann["segmentation"])
            base = {"mask_json_path": store.relative(store.masks(image_id)), "img_caption": caption}
            request = EditRequest("remove", k, name, "", spec.remove_prompt, self._seed(image_id, k, "remove"))
            removed, region = self.inpainter.inpaint(image_id, image, mask, request)
            if region.any():
                atomic_write_png(removed_path, removed)
                written.append(removed_path)
                edit = {**base, "detailed_caption": detail, **_region_fields(region)}
                edited = store.relative(removed_path)
                for record in (
                    {"origin_img_path": source, "target_img_path": edited, "instruction": [f"remove the {name}"],
                     "task_type": "remove", "class_origin": name, "class_target": "", **edit},
                    {"origin_img_path": edited, "target_img_path": source,
                     "instruction": [f"add a {name} {place_phrase(region)}"], "task_type": "add", "class_origin": "",
                     "class_target": name, **edit},
                ):  # fmt: skip
                    groups["remove_add"][str(len(groups["remove_add"]))] = record
            seed = self._seed(image_id, k, "replace")
            request = EditRequest("replace", k, name, new.name, new.detailed_caption, seed)
            replaced, region = self.inpainter.inpaint(image_id, image, mask, request)
            if region.any():
                atomic_write_png(replaced_path, replaced)
                written.append(replaced_path)
                edit = {**base, "detailed_caption": detail, **_region_fields(region)}
                edited = store.relative(replaced_path)
                for origin, target, (a, b), (detail_a, detail_b) in (
                    (source, edited, (name, new.name), (detail, new.detailed_caption)),
                    (edited, source, (new.name, name), (new.detailed_caption, detail)),
                ):
                    groups["replace"][str(len(groups["replace"]))] = {
                        "origin_img_path": origin, "target_img_path": target,
                        "instruction": [f"change the {a} to {b}", f"replace the {a} with {b}"], "task_type": "replace",
                        "class_origin": a, "class_target": b, "detailed_caption_origin": detail_a,
                        "detailed_caption_target": detail_b, **edit,
                    }  # fmt: skip
        for group, path in zip(GROUPS, record_files, strict=True):
            atomic_write_json(path, groups[group])
        counts = {group: len(records) for group, records in groups.items()}
        return StepResult(written + record_files, {"records": counts})


class RewriteStep(Step):
    """Step 4: simple and reasoning instructions for every record of step 3."""

    number, name = 4, "rewrite"

    @property
    def concurrency(self) -> int:
        """The API's concurrency for ``openai``, else 1."""
        spec = self.context.config.steps.rewrite
        return spec.concurrency if spec.backend == "openai" else 1

    def setup(self, device: str) -> None:
        """The oracle or a chat rewriter."""
        spec = self.context.config.steps.rewrite
        if spec.backend == "oracle":
            self.rewriter: Any = OracleRewriter(self.context.images_root, spec.delay_s)
        else:
            self.rewriter = ChatRewriter(_json_chat(spec.chat_spec(), self.context, device))

    def process(self, image_id: str) -> StepResult:
        """Append the simple version to ``instruction``; reasoning versions become ``reasoning_instruction{i}``."""
        store = self.context.store
        files = []
        for group, records in store.read_records(3, image_id).items():
            rewritten = {}
            for key, record in records.items():
                answer = self.rewriter.rewrite(image_id, record)
                instructions = list(record["instruction"])
                if answer.simple not in instructions:
                    instructions.append(answer.simple)
                reasoning = {f"reasoning_instruction{i}": text for i, text in enumerate(answer.reasoning, start=1)}
                rewritten[key] = {**record, "instruction": instructions, **reasoning}
            path = store.records(4, group, image_id)
            atomic_write_json(path, rewritten)
            files.append(path)
        return StepResult(files)


class FilterStep(Step):
    """Step 5: VIEScore every record with the judge and mark which pass the threshold."""

    number, name = 5, "filter"

    @property
    def concurrency(self) -> int:
        """The API's concurrency for ``openai``, else 1."""
        spec = self.context.config.steps.filter
        return spec.concurrency if spec.backend == "openai" else 1

    def setup(self, device: str) -> None:
        """The VIEScore scorer with the oracle or a chat judge, through the reply cache."""
        spec = self.context.config.steps.filter
        judge: Any = OracleJudge() if spec.backend == "oracle" else make_chat(spec.chat_spec(), device)
        self.scorer = VIEScorer(judge, self.context.cache, parse_retries=spec.parse_retries)

    def process(self, image_id: str) -> StepResult:
        """Score; a judge that cannot be reached fails the image (retryable), an unreadable reply fails the record."""
        store, threshold = self.context.store, self.context.config.steps.filter.threshold
        files, totals = [], {"scored": 0, "passed": 0, "unscored": 0}
        for group, records in store.read_records(4, image_id).items():
            scored = {}
            for key, record in records.items():
                source = _read(store.root / record["origin_img_path"])
                target = _read(store.root / record["target_img_path"])
                result = self.scorer.score(VIEScoreItem(source, target, record["instruction"][0]))
                errors = [e for e in (result.sc_error, result.pq_error) if e]
                if any(e.startswith("judge error") for e in errors):
                    raise StepFailure(f"{group}/{key}: {errors[0]}")
                overall = None if result.overall is None else round(result.overall / 10, 4)
                passed = overall is not None and overall >= threshold
                totals["scored" if overall is not None else "unscored"] += 1
                totals["passed"] += int(passed)
                sc, pq = result.sc_scores, result.pq_scores
                halved_sc = (
                    {"instruction_follow": sc[0] / 2, "non-overedit": sc[1] / 2, "reasoning": ""} if sc else None
                )
                halved_pq = {"naturalness": pq[0] / 2, "no_artifacts": pq[1] / 2, "reasoning": ""} if pq else None
                scored[key] = {
                    **record,
                    "qwen_VIE_SC": halved_sc,
                    "qwen_VIE_PQ": halved_pq,
                    "viescore": {"sc": sc, "pq": pq, "overall/10": overall, "threshold": threshold, "passed": passed,
                                 "judge": self.scorer.label, "errors": errors},
                }  # fmt: skip
            path = store.records(5, group, image_id)
            atomic_write_json(path, scored)
            files.append(path)
        return StepResult(files, totals)


STEPS: dict[int, type[Step]] = {1: CaptionStep, 2: SegmentStep, 3: InpaintStep, 4: RewriteStep, 5: FilterStep}
