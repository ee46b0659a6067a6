"""Builders shared by the evaluation tests (no tests here): a tiny CLIP folder and a planted Reason-Edit set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

WORDS = ["a", "red", "apple", "on", "the", "table", "green", "cup", "dog", "left", "photo", "of", "cat"]


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny CLIPModel with a word-level tokenizer and a CLIP image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<eos>",
        unk_token="<unk>",
        model_max_length=16,
    )
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def photo(name: str, size: int = 96) -> Image.Image:
    """A real photo shipped with scikit-image, resized to a small square."""
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def plant_reason_edit(root: Path) -> dict[str, list[str]]:
    """Two Reason-Edit subsets with real photos, JPEG masks and 'instruction CLIP: caption' lines."""
    layout = {
        "1-Left-Right": ("Left_Right_text.txt", ["astronaut", "coffee"]),
        "6-Reasoning": ("Reason_test.txt", ["chelsea"]),
    }
    ids: dict[str, list[str]] = {}
    for folder, (text_file, names) in layout.items():
        directory = root / "benchmark" / folder
        directory.mkdir(parents=True)
        lines = []
        for index, name in enumerate(names):
            stem = f"{index + 1:03d}"
            photo(name).save(directory / f"{stem}.png")
            mask = np.zeros((96, 96), dtype=np.uint8)
            mask[20 + 10 * index : 60, 30:70] = 255
            Image.fromarray(mask, mode="L").save(directory / f"{stem}_mask.jpg", quality=95)
            lines.append(f"make the {name} red CLIP: a red apple on the table")
            ids.setdefault(folder, []).append(f"{folder}/{stem}")
        (directory / text_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ids
