"""CLIPScore = max(100 · cos(image, text), 0), computed directly from a transformers ``CLIPModel``.

torchmetrics' CLIPScore reads ``get_image_features`` as a tensor, which transformers 5 turned into a
model output, so the embeddings are computed here explicitly: the pooled output of the vision (text)
tower through ``visual_projection`` (``text_projection``), L2-normalised. Captions go through the model's
tokenizer, truncated to its context (77 tokens).

Images are preprocessed one of two named ways (:data:`CLIP_PREPROCESSING`). ``"pil"`` resizes with PIL's
bicubic filter, as OpenAI's CLIP ``preprocess`` and transformers 4.x's ``CLIPImageProcessor`` (behind
torchmetrics' ``CLIPScore``, hence behind published CLIPScores) did; ``"processor"`` runs the model's image
processor as the installed transformers loads it, which in transformers 5 resizes with torchvision's
antialiased bicubic kernel, a different filter (about 7e-3 CLIPScore points apart on a tiny model).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from insightedit.errors import UserError

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"

CLIP_PREPROCESSING: dict[str, str] = {
    "pil": (
        "PIL bicubic resize of the short side to the model's size (long side int(size * long / short)), centre "
        "crop at floor((side - crop) / 2), x / 255, normalised by the model's mean and std (float32): "
        "transformers 4.x CLIPImageProcessor as torchmetrics' CLIPScore ran it; OpenAI CLIP's resize"
    ),
    "processor": "the model's image processor as the installed transformers loads it (v5: torchvision resize)",
}


def _setting(config: object, key: str) -> object:
    """``config[key]`` for a dict, ``config.key`` otherwise (transformers 5 keeps sizes in a ``SizeDict``)."""
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def pil_clip_pixels(images: Sequence[Image.Image], image_processor: Any) -> Tensor:
    """``(N, 3, crop, crop)`` CLIP pixel values computed with PIL, reading sizes, mean and std from the processor.

    The short side is resized to ``size["shortest_edge"]`` with PIL bicubic (or the image to
    ``size["height"] x size["width"]``), then centre-cropped to ``crop_size`` with the top-left corner at
    ``floor((side - crop) / 2)``, scaled by ``rescale_factor`` and normalised, as transformers 4.x did.
    """
    size = getattr(image_processor, "size", None)
    crop = getattr(image_processor, "crop_size", None)
    shortest = _setting(size, "shortest_edge")
    height, width = _setting(size, "height"), _setting(size, "width")
    if shortest is None and (height is None or width is None):
        raise ValueError(f"image processor size {size!r} has neither shortest_edge nor height and width")
    do_crop = bool(getattr(image_processor, "do_center_crop", True)) and crop is not None
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    pixels = []
    for image in images:
        image = image.convert("RGB")
        if shortest is not None:
            short, long = sorted(image.size)
            new_long = int(int(shortest) * long / short)
            new_size = (int(shortest), new_long) if image.width <= image.height else (new_long, int(shortest))
        else:
            new_size = (int(width), int(height))
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
        if do_crop:
            crop_h, crop_w = int(_setting(crop, "height")), int(_setting(crop, "width"))
            top, left = (image.height - crop_h) // 2, (image.width - crop_w) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h))  # outside the image: zeros
        values = (np.asarray(image, dtype=np.float32) * np.float32(scale) - mean) / std  # (H, W, 3)
        pixels.append(torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1))))
    return torch.stack(pixels)


def clip_score_from_embeddings(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """CLIPScore for paired rows: ``max(100 · cos, 0)`` of ``(N, D)`` image and text embeddings."""
    cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return (100.0 * cosine).clamp(min=0.0)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """SmartEdit's crop box ``(left, top, right, bottom)`` from the mask's non-zero pixels; ``None`` if empty.

    As in SmartEdit's script the box ends at the last mask row/column *exclusively* (PIL crop
    semantics with ``right = max x``), so the crop is one pixel narrower and shorter than the mask's
    extent; a box that would be empty is widened by one pixel.
    """
    ys, xs = np.nonzero(np.asarray(mask))
    if len(ys) == 0:
        return None
    left, top, right, bottom = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    return left, top, max(right, left + 1), max(bottom, top + 1)


def crop_to_mask_bbox(image: Image.Image, mask: np.ndarray) -> Image.Image | None:
    """Crop ``image`` to :func:`mask_bbox` of a mask of the same size; ``None`` when the mask is empty."""
    if tuple(np.asarray(mask).shape[:2]) != (image.height, image.width):
        raise ValueError(f"mask shape {np.asarray(mask).shape[:2]} differs from image size {image.size[::-1]}")
    box = mask_bbox(mask)
    return None if box is None else image.crop(box)


class ClipScorer:
    """Scores images against captions with a CLIP model (local folder or hub id)."""

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: object,
        tokenizer: object,
        name: str,
        device: str = "cpu",
        preprocessing: str = "pil",
    ) -> None:
        if preprocessing not in CLIP_PREPROCESSING:
            raise UserError(
                f"unknown CLIP preprocessing {preprocessing!r}; choose from {', '.join(sorted(CLIP_PREPROCESSING))}"
            )
        self.preprocessing = preprocessing
        self.model = model.to(device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str = "cpu", preprocessing: str = "pil") -> ClipScorer:
        """Load ``CLIPModel``, its image processor and tokenizer; clear error if unavailable."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        source = str(name_or_path)
        if Path(source).expanduser().exists():
            source = str(Path(source).expanduser())
            if not (Path(source) / "config.json").is_file():
                raise UserError(f"CLIP folder {source} has no config.json (save it with CLIPModel.save_pretrained)")
        try:
            model = CLIPModel.from_pretrained(source)
            image_processor = AutoImageProcessor.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise UserError(
                f"cannot load CLIP model {source!r} ({str(error).splitlines()[0]}). Nothing is downloaded "
                f"unless you allow it: run `huggingface-cli download {DEFAULT_CLIP_MODEL}` on a machine with "
                "internet and pass --clip-model with that folder, or pass --no-clip"
            ) from error
        return cls(model, image_processor, tokenizer, name=source, device=device, preprocessing=preprocessing)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """L2-normalised image embeddings ``(N, D)``."""
        if self.preprocessing == "pil":
            pixels = pil_clip_pixels(images, self.image_processor)
        else:
            pixels = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")[
                "pixel_values"
            ]
        pixels = pixels.to(self.device, dtype=next(self.model.parameters()).dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # (N, d_vision)
        embeds = self.model.visual_projection(pooled)  # (N, D)
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``(N, D)``, truncated to the model's context length."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        output = self.model.text_model(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
        )
        embeds = self.model.text_projection(output.pooler_output)  # (N, D)
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    def score(self, image: Image.Image, text: str) -> float:
        """CLIPScore ``max(100 · cos, 0)`` of one image and one caption."""
        return float(clip_score_from_embeddings(self.embed_images([image]), self.embed_texts([text]))[0])
