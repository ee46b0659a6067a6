"""The frozen CLIP text encoder (SD1.5's for the full preset) and a tokenizer for the tiny twin built offline.

The text encoder gives the generation module its null condition (the encoding of ``""``, as in
InstructPix2Pix), lets the generation module train on its own from instruction strings, and gives stage 1
its alignment target (the encoding of the target caption).

Its weights may come from a CLIP folder (``generation.text_encoder``): a ``CLIPModel.save_pretrained``
folder with its tokenizer, such as ``openai/clip-vit-large-patch14`` or the tiny CLIP foundation's
``export/`` (``insightedit foundations``). :func:`clip_folder_text_parts` reads its config and tokenizer
when the model is built; :func:`load_clip_folder_text_encoder` reads the weights at the load step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from insightedit.errors import UserError
from insightedit.models.loading import assign_or_copy
from insightedit.models.loads import report_loaded

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


TEXT_ENCODER_SETTING = "generation.text_encoder"
FOUNDATIONS_COMMAND = "insightedit foundations"


def _missing_clip_folder(folder: str | Path) -> UserError:
    return UserError(
        f"{TEXT_ENCODER_SETTING}: {folder} is not a CLIP folder (no config.json there); build the tiny "
        f"foundations with `{FOUNDATIONS_COMMAND}`, or set {TEXT_ENCODER_SETTING} to null"
    )


def clip_folder_text_parts(folder: str | Path) -> tuple[CLIPTextConfig, CLIPTokenizer | None] | None:
    """The text config and tokenizer of a CLIP folder (no weights read); ``None`` when the folder is absent.

    ``folder`` is a ``CLIPModel`` (or ``CLIPTextModel``) ``save_pretrained`` folder; the tokenizer is
    ``None`` when the folder holds none. An absent folder is not an error here: building only needs
    the shapes, and :func:`load_clip_folder_text_encoder` says what is missing at the load step.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    config = CLIPTextConfig.from_pretrained(str(folder))
    try:
        tokenizer: CLIPTokenizer | None = CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, TypeError, ValueError):  # a folder without tokenizer files
        tokenizer = None
    return config, tokenizer


def load_clip_folder_text_encoder(encoder: FrozenTextEncoder, folder: str | Path) -> None:
    """Read the text tower of the CLIP folder ``folder`` (and its tokenizer) into ``encoder``, every key.

    A missing folder or one whose text tower does not fit ``encoder`` is one
    :class:`~insightedit.errors.UserError` line naming the folder and ``insightedit foundations``.
    """
    if clip_folder_text_parts(folder) is None:
        raise _missing_clip_folder(folder)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its report lists the image tower's keys, left out by design
    try:
        model = CLIPTextModel.from_pretrained(str(folder))
    finally:
        transformers_logging.set_verbosity(verbosity)
    state = model.state_dict()
    try:
        assign_or_copy(encoder.model, state)
    except RuntimeError as error:  # shapes or keys that do not fit the text encoder built from the config
        first = str(error).splitlines()[1:2] or [str(error)]
        raise UserError(
            f"{TEXT_ENCODER_SETTING}: {folder}'s text tower does not fit the generation module's text encoder "
            f"({first[0].strip()}); rebuild it with `{FOUNDATIONS_COMMAND} --rebuild`"
        ) from error
    encoder.model.requires_grad_(False).eval()
    try:
        encoder.tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=encoder.max_length)
    except (OSError, TypeError, ValueError):
        pass  # no tokenizer in the folder: the built one stays
    report_loaded(TEXT_ENCODER_SETTING, len(state), folder, "the CLIP text tower and its tokenizer")
