"""The frozen CLIP text encoder (SD1.5's for the full preset) and a tokenizer for the tiny twin built offline.

The text encoder gives the generation module its null condition (the encoding of ``""``, as in
InstructPix2Pix), lets the generation module train on its own from instruction strings, and gives stage 1
its alignment target (the encoding of the target caption).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_TOKENIZER_VOCAB = "vocab.json"
TINY_TOKENIZER_MERGES = "merges.txt"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes (GPT-2's table)."""
    codes = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    codes += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    table = {code: code for code in codes}
    for byte in range(256):
        if byte not in table:
            table[byte] = 256 + extra
            extra += 1
    return [chr(table[byte]) for byte in range(256)]


def write_tiny_clip_tokenizer(directory: str | Path) -> Path:
    """Write a character-level CLIP tokenizer (no merges, 514 tokens) to ``directory``; return it.

    It is a real ``CLIPTokenizer`` (same class and files as SD1.5's), only with an empty merge table,
    so the tiny twin goes through the same tokenization code as the full model without a download.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / TINY_TOKENIZER_VOCAB).write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / TINY_TOKENIZER_MERGES).write_text("#version: 0.2\n")
    return directory


def tiny_clip_tokenizer(directory: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """Build (or reuse) the tiny tokenizer in ``directory`` and load it with ``CLIPTokenizer``."""
    directory = Path(directory)
    if not (directory / TINY_TOKENIZER_VOCAB).is_file():
        write_tiny_clip_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=max_length)


def tiny_clip_text_config(hidden_size: int = 32, vocab_size: int = 514) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder matching :func:`tiny_clip_tokenizer`."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


class FrozenTextEncoder(nn.Module):
    """A frozen CLIP text encoder with its tokenizer: strings -> last hidden states (B, 77, D)."""

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer | None) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.hidden_size = int(model.config.hidden_size)
        self.max_length = int(model.config.max_position_embeddings)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stay in eval mode: the encoder is frozen."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        """Encode ``texts`` padded to the tokenizer's max length (77), as Stable Diffusion does."""
        if self.tokenizer is None:
            raise RuntimeError("this text encoder has no tokenizer (a meta-device build): load real weights")
        device = self.model.get_input_embeddings().weight.device
        ids = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self.model(ids).last_hidden_state
