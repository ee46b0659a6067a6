"""CLIPScore formula and the bounding-box crop protocol on a randomly initialised tiny CLIP."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_support import build_tiny_clip, photo

from insightedit.errors import UserError
from insightedit.evaluation.clip_score import (
    ClipScorer,
    clip_score_from_embeddings,
    crop_to_mask_bbox,
    mask_bbox,
)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@functools.cache
def _reference_parts(folder: Path) -> tuple:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    return model, AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _direct(folder: Path, image: Image.Image, text: str) -> float:
    """max(100 · cos, 0) through CLIPModel.forward's logits (a path independent of ClipScorer)."""
    model, processor, tokenizer = _reference_parts(folder)
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    tokens = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        output = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        cosine = float(output.logits_per_image[0, 0] / model.logit_scale.exp())
    return max(100.0 * cosine, 0.0)


def test_formula_clamps_negative_cosine_at_zero() -> None:
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [4.0, 3.0]])
    scores = clip_score_from_embeddings(image, text)
    assert torch.allclose(scores, torch.tensor([100.0, 0.0, 96.0]))


def test_clip_score_matches_direct_computation(tiny_clip: Path) -> None:
    scorer = ClipScorer.from_pretrained(tiny_clip, preprocessing="processor")  # as _direct preprocesses
    values = []
    for name in ("astronaut", "coffee", "chelsea"):
        for text in ("a red apple on the table", "a photo of a dog", "green cup"):
            ours = scorer.score(photo(name, 48), text)
            assert abs(ours - _direct(tiny_clip, photo(name, 48), text)) < 1e-4
            values.append(ours)
    assert min(values) >= 0.0
    assert len({round(v, 4) for v in values if v > 0}) >= 2  # not a trivial all-zero comparison


def test_bbox_crop_protocol(tiny_clip: Path) -> None:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:30, 20:50] = 255  # rows 10..29, columns 20..49
    assert mask_bbox(mask) == (20, 10, 49, 29)  # SmartEdit: right/bottom = last index, exclusive in PIL
    image = photo("astronaut", 64)
    crop = crop_to_mask_bbox(image, mask)
    assert crop is not None and crop.size == (29, 19)
    assert np.array_equal(np.asarray(crop), np.asarray(image)[10:29, 20:49])
    assert crop_to_mask_bbox(image, np.zeros((64, 64), dtype=np.uint8)) is None
    one_pixel = np.zeros((64, 64), dtype=np.uint8)
    one_pixel[5, 7] = 1
    assert mask_bbox(one_pixel) == (7, 5, 8, 6)
    scorer = ClipScorer.from_pretrained(tiny_clip, preprocessing="processor")  # as _direct preprocesses
    assert abs(scorer.score(crop, "a red apple") - _direct(tiny_clip, crop, "a red apple")) < 1e-4


def test_missing_clip_model_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--clip-model"):
        ClipScorer.from_pretrained("openai/clip-vit-large-patch14-not-cached-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        ClipScorer.from_pretrained(tmp_path / "empty")
