"""The tiny CLIP foundation: a transformers ``CLIPModel`` whose towers are the twin's text encoder and vision tower.

Its text tower is :func:`~insightedit.models.text_encoder.tiny_clip_text_config` (the twin's text encoder,
read with the character-level tokenizer), its vision tower is
:data:`~insightedit.models.comprehension.presets.TINY_VISION_CONFIG` (the tiny LLaVA's), and its 32-d image
embedding is the IAA target (``bridging.clip_pretrained``), as CLIP ViT-L/14 is all three in the full
system. Trained with CLIP's symmetric InfoNCE loss and learnable temperature; measured by zero-shot
retrieval between held-out images and captions. Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from insightedit.models.comprehension.presets import TINY_VISION_CONFIG
from insightedit.models.foundations.export import write_foundation_export
from insightedit.models.text_encoder import tiny_clip_text_config, tiny_clip_tokenizer

TINY_PROJECTION_DIM = 32  # == the tiny bridging preset's clip_dim (the IAA embedding)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100


def tiny_clip_config() -> CLIPConfig:
    """The tiny CLIP: the twin's text encoder config, the tiny LLaVA's vision config, 32-d projections."""
    return CLIPConfig(
        text_config=tiny_clip_text_config().to_dict(),
        vision_config=dict(TINY_VISION_CONFIG),
        projection_dim=TINY_PROJECTION_DIM,
    )


class TinyClip(nn.Module):
    """A ``CLIPModel`` with its tokenizer: strings and CLIP-normalised pixels in, embeddings and the loss out.

    Args:
        model: the CLIP (default: a fresh :func:`tiny_clip_config` model).
        tokenizer: its tokenizer (default: the twin's character-level tokenizer, built in ``tokenizer_dir``).
        tokenizer_dir: where the default tokenizer's files are written (default: the insightedit cache).
    """

    def __init__(
        self,
        model: CLIPModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        tokenizer_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model if model is not None else CLIPModel(tiny_clip_config())
        if tokenizer is None:
            if tokenizer_dir is None:
                from insightedit.models.generation.presets import cache_dir

                tokenizer_dir = cache_dir() / "tiny-clip-tokenizer"
            length = self.model.config.text_config.max_position_embeddings
            tokenizer = tiny_clip_tokenizer(tokenizer_dir, max_length=length)
        self.tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask (B, L), padded to the longest text (at most 77 tokens)."""
        tokens = self.tokenizer(list(texts), padding="longest", truncation=True, return_tensors="pt")
        device = self.model.logit_scale.device
        return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected text embeddings (B, 32), not normalised (``CLIPModel.get_text_features``)."""
        return self.model.get_text_features(**self.tokenize(texts)).pooler_output

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (B, 32) of CLIP-normalised pixels (``CLIPModel.get_image_features``)."""
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def contrastive_loss(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP's symmetric InfoNCE over the batch (the i-th image goes with the i-th text), learned temperature."""
        with torch.no_grad():  # as CLIP: the temperature never exceeds 100
            self.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        return self.model(pixel_values=pixels, **self.tokenize(texts), return_loss=True).loss

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the ``CLIPModel`` and its tokenizer to ``directory`` (``from_pretrained`` reads either tower)."""
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))


def retrieval_top1(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    captions: list[str],
    true_captions: list[frozenset[str]] | None = None,
) -> tuple[float, float]:
    """Zero-shot retrieval top-1 among N pairs: (image -> caption, caption -> image).

    Image ``i`` retrieves the caption with the highest cosine similarity among the N; it is correct when that
    caption's text equals caption ``i``'s (two scenes may share a caption word for word, and neither
    retrieval can tell them apart), or, given ``true_captions[i]`` (every caption true of image ``i``), when
    it is one of those. Likewise caption ``i`` retrieves an image ``j``, correct when caption ``j``'s text
    equals caption ``i``'s (or caption ``i`` is in ``true_captions[j]``).
    """
    image_embeds = nn.functional.normalize(image_embeds.float(), dim=-1)
    text_embeds = nn.functional.normalize(text_embeds.float(), dim=-1)
    similarity = image_embeds @ text_embeds.T  # (N images, N captions)
    to_text, to_image = similarity.argmax(dim=1).tolist(), similarity.argmax(dim=0).tolist()
    if true_captions is None:
        true_captions = [frozenset([caption]) for caption in captions]
    image_to_text = sum(captions[j] in true_captions[i] or captions[j] == captions[i] for i, j in enumerate(to_text))
    text_to_image = sum(captions[i] in true_captions[j] or captions[j] == captions[i] for i, j in enumerate(to_image))
    return image_to_text / len(captions), text_to_image / len(captions)


def write_clip_export(clip: TinyClip, directory: str | Path, metric: dict[str, float], steps: int) -> Path:
    """Save the ``CLIPModel``, its tokenizer and ``foundation.json`` (kind ``clip``) to ``directory``; return it."""
    return write_foundation_export(directory, "clip", clip.save_pretrained, metric, steps)
