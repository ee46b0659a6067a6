"""CLIPScore = max(100 · cos(image, text), 0), computed directly from a transformers ``CLIPModel``.

torchmetrics' CLIPScore reads ``get_image_features`` as a tensor, which transformers 5 turned into a
model output, so the embeddings are computed here explicitly: the pooled output of the vision (text)
tower through ``visual_projection`` (``text_projection``), L2-normalised. Preprocessing is the model's
own image processor (for OpenAI CLIP: bicubic resize of the short side to 224, centre crop,
normalisation) and its tokenizer truncated to the model's context (77 tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from insightedit.errors import UserError

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


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
    ) -> None:
        self.model = model.to(device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str = "cpu") -> ClipScorer:
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
        return cls(model, image_processor, tokenizer, name=source, device=device)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """L2-normalised image embeddings ``(N, D)``."""
        batch = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixels = batch["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
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
