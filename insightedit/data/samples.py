"""Turn an :class:`EditRecord` into a training sample: paired transform, mask, instruction, CLIP views."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from insightedit.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    BadSample,
    LoadedImage,
    center_square_box,
    clip_preprocess,
    load_rgb,
    mask_to_tensor,
    resize_crop,
    same_aspect,
    to_signed_tensor,
)
from insightedit.data.records import MAX_INSTRUCTION_CHARS, EditRecord, InvalidMask, decode_mask

# EXIF orientation value → the PIL transpose that displays it (as ImageOps.exif_transpose does).
ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class SampleConfig:
    """Sizes and normalisation of one sample's tensors."""

    resolution: int = 256
    clip_size: int = 224
    clip_mean: Sequence[float] = CLIP_MEAN
    clip_std: Sequence[float] = CLIP_STD
    mllm_size: int = 336
    mllm_mean: Sequence[float] = CLIP_MEAN
    mllm_std: Sequence[float] = CLIP_STD
    reasoning_probability: float = 0.5


def plain_instruction(record: EditRecord) -> str:
    """The record's first simple (templated) instruction; its first reasoning one when it has none."""
    pool = record.instructions or record.reasoning_instructions
    return pool[0][:MAX_INSTRUCTION_CHARS] if pool else ""


def choose_instruction(record: EditRecord, reasoning_probability: float, rng: random.Random) -> str:
    """A reasoning phrasing with probability ``reasoning_probability`` (if any), else a templated one.

    At most :data:`~insightedit.data.records.MAX_INSTRUCTION_CHARS` characters; raise :class:`BadSample`
    when the record has no instruction.
    """
    if not record.instructions and not record.reasoning_instructions:
        raise BadSample("empty instruction")
    use_reasoning = record.reasoning_instructions and (not record.instructions or rng.random() < reasoning_probability)
    pool = record.reasoning_instructions if use_reasoning else record.instructions
    return pool[rng.randrange(len(pool))][:MAX_INSTRUCTION_CHARS]


def mask_for_source(record: EditRecord, source: LoadedImage) -> Image.Image:
    """The record's mask as an ``L`` image in the source's displayed frame; raise :class:`BadSample`."""
    try:
        mask = decode_mask(record.segmentation)
    except InvalidMask as error:
        raise BadSample(f"invalid RLE: {error}") from None
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    # A mask drawn on the stored pixels (as the official pipeline does) follows the source's EXIF
    # rotation; a mask already in the displayed frame is used as is (indistinguishable for 180°).
    if source.transposed and image.size == source.raw_size and image.size != source.image.size:
        orientation = source.orientation
        if orientation in ORIENTATION_TRANSPOSE:
            image = image.transpose(ORIENTATION_TRANSPOSE[orientation])
    if not same_aspect(image.size, source.image.size):
        raise BadSample(
            f"mask size {image.size[0]}x{image.size[1]} does not match source "
            f"{source.image.size[0]}x{source.image.size[1]}"
        )
    return image


def resolved_paths(record: EditRecord) -> tuple[Path, Path]:
    """Source and target paths of ``record``; raise :class:`BadSample` where they were not resolved."""
    if "unresolved" in record.extra:
        raise BadSample(str(record.extra["unresolved"]))
    if record.target_path is None:
        raise BadSample("no target image")
    return record.source_path, record.target_path


def check_pair(record: EditRecord, source: LoadedImage, target: LoadedImage) -> Image.Image:
    """Check that source and target agree in aspect and return the mask; raise :class:`BadSample`."""
    if not same_aspect(source.image.size, target.image.size):
        raise BadSample(
            f"source/target size mismatch {source.image.size[0]}x{source.image.size[1]} vs "
            f"{target.image.size[0]}x{target.image.size[1]}"
        )
    return mask_for_source(record, source)


def load_pair(record: EditRecord) -> tuple[LoadedImage, LoadedImage, Image.Image]:
    """Load and check source, target and mask of ``record``; raise :class:`BadSample` with the reason."""
    source_path, target_path = resolved_paths(record)
    source, target = load_rgb(source_path), load_rgb(target_path)
    return source, target, check_pair(record, source, target)


class SampleBuilder:
    """Builds the sample dict of the data contract from a record (source/target/mask/CLIP views)."""

    def __init__(self, config: SampleConfig) -> None:
        self.config = config
        self.clip = clip_preprocess(config.clip_size, config.clip_mean, config.clip_std)
        self.mllm = clip_preprocess(config.mllm_size, config.mllm_mean, config.mllm_std)

    def from_images(
        self,
        record: EditRecord,
        source: Image.Image,
        target: Image.Image,
        mask: Image.Image,
        rng: random.Random,
    ) -> dict[str, Any]:
        """The sample from already loaded RGB images and an ``L`` mask (any sizes of one aspect)."""
        size = self.config.resolution
        box = center_square_box(*source.size)
        resized_mask = resize_crop(mask, box, size, Image.Resampling.NEAREST)
        return {
            "source": to_signed_tensor(resize_crop(source, box, size, Image.Resampling.BICUBIC)),
            "target": to_signed_tensor(resize_crop(target, box, size, Image.Resampling.BICUBIC)),
            "mask": mask_to_tensor(resized_mask),
            "instruction": choose_instruction(record, self.config.reasoning_probability, rng),
            # the explicit (templated) phrasing, whatever was chosen above: stage-1 alignment's target text
            "plain_instruction": plain_instruction(record),
            "target_caption": record.target_caption,
            "task_type": record.task_type,
            "record_id": record.id,
            "source_id": record.source_id,
            "clip_target": self.clip(target),  # (3, clip_size, clip_size)
            "mllm_source": self.mllm(source),  # (3, mllm_size, mllm_size)
        }

    def __call__(self, record: EditRecord, rng: random.Random) -> dict[str, Any]:
        """Load ``record`` from disk and build its sample; raise :class:`BadSample` when unusable."""
        source, target, mask = load_pair(record)
        return self.from_images(record, source.image, target.image, mask, rng)


def collate_samples(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Default-collate samples, dropping any ``None`` a dataset returned for an unusable item."""
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        raise RuntimeError("a whole batch of samples failed to load")
    return torch.utils.data.default_collate(kept)
