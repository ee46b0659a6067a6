"""The tiny LLaVA foundation: LLaVA-1.5's two-phase recipe on the twin, as plain functions (no Lightning).

The model is the twin's own tiny LLaVA (:func:`~insightedit.models.comprehension.presets.build_tiny_llava`,
its tokenizer and seed) whose vision tower is the CLIP foundation's (frozen, as in LLaVA). Phase
``align`` trains only the ``multi_modal_projector`` on captions; phase ``instruct`` trains the projector
and the whole language model (embeddings and head included) on questions. Each turn is the project's
LLaVA prompt (:class:`~insightedit.models.comprehension.prompts.PromptEncoder`'s ``head``) followed by
`` {answer}</s>``; the loss is the NLL of the answer and its end token only. Answers are generated
greedily up to the end token and scored by exact match after normalising case and spaces.
The export is a ``LlavaForConditionalGeneration.save_pretrained`` folder with the tokenizer (the layout
of :func:`~insightedit.models.comprehension.presets.write_tiny_llava`), so ``comprehension.pretrained``
reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPVisionModel, LlavaForConditionalGeneration, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from insightedit.errors import UserError
from insightedit.models.comprehension.presets import build_tiny_llava, tiny_llava_dir
from insightedit.models.comprehension.prompts import IGNORE_INDEX, PromptEncoder
from insightedit.models.foundations.export import write_foundation_export

PHASES: tuple[str, ...] = ("align", "instruct")
BUILD_COMMAND = "insightedit foundations"
CACHE_SIZE = 100_000  # tokenised texts kept by a ConversationEncoder
# vision-config fields that must agree for a CLIP vision tower to be the LLaVA's
VISION_FIELDS: tuple[str, ...] = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
    "hidden_act", "num_channels",
)  # fmt: skip


def build_foundation_llava(
    vision_tower: str | Path | None = None,
    vision_feature_layer: int | None = None,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """The twin's tiny LLaVA (seeded) and tokenizer, its vision tower read from a CLIP export when named.

    ``vision_tower``: a CLIP foundation export (``CLIPVisionModel.from_pretrained`` reads it); ``None``
    keeps the seeded random tower. ``vision_feature_layer``: the tower's hidden state the projector reads
    (default the preset's, LLaVA-1.5's -2; it is saved in the export's config, which the twin reads).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llava_dir()))
    llava = build_tiny_llava(tokenizer)
    if vision_feature_layer is not None:
        layers = int(llava.config.vision_config.num_hidden_layers)
        if not -layers - 1 <= vision_feature_layer <= layers:
            raise UserError(
                f"vision_feature_layer: {vision_feature_layer} is not a hidden state of the {layers}-layer vision tower"
            )
        llava.config.vision_feature_layer = vision_feature_layer
    if vision_tower is not None:
        load_vision_tower(llava, vision_tower)
    return llava, tokenizer


def load_vision_tower(llava: LlavaForConditionalGeneration, export: str | Path) -> None:
    """Copy the vision tower of the CLIP export ``export`` into ``llava`` (every tensor, shapes checked)."""
    export = Path(export)
    if not (export / "config.json").is_file():
        raise UserError(f"vision_tower: no CLIP foundation export at {export}; build it with `{BUILD_COMMAND}`")
    quiet = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a CLIPModel folder: its text tower is "unexpected" here, as meant
    try:
        clip = CLIPVisionModel.from_pretrained(str(export))
    finally:
        hf_logging.set_verbosity(quiet)
    ours: Any = llava.config.vision_config
    differ = [f"{name} {getattr(clip.config, name)} != {getattr(ours, name)}"
              for name in VISION_FIELDS if getattr(clip.config, name) != getattr(ours, name)]  # fmt: skip
    if differ:
        raise UserError(f"vision_tower: {export}'s vision tower is not the tiny LLaVA's ({', '.join(differ)})")
    llava.model.vision_tower.load_state_dict(clip.state_dict(), strict=True)


def phase_modules(
    llava: LlavaForConditionalGeneration, phase: str, train_vision_tower: bool = False
) -> dict[str, nn.Module]:
    """The modules that train in ``phase``: ``projector`` in both, ``language_model`` and ``lm_head`` in instruct.

    ``train_vision_tower`` adds ``vision_tower`` in instruct (as LLaVA-NeXT; LLaVA-1.5 keeps it frozen).
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    modules: dict[str, nn.Module] = {"projector": llava.model.multi_modal_projector}
    if phase == "instruct":
        modules |= {"language_model": llava.model.language_model, "lm_head": llava.lm_head}
        if train_vision_tower:
            modules["vision_tower"] = llava.model.vision_tower
    return modules


def set_phase(llava: LlavaForConditionalGeneration, phase: str, train_vision_tower: bool = False) -> None:
    """Freeze everything, then unfreeze what trains in ``phase`` (the vision tower only if ``train_vision_tower``)."""
    trains = phase_modules(llava, phase, train_vision_tower)
    llava.requires_grad_(False)
    for module in trains.values():
        module.requires_grad_(True)


@dataclass
class Conversations:
    """A left-padded batch of turns: prompt head, answer, end token; labels on the answer and end token only."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    labels: torch.Tensor  # (B, L) long, IGNORE_INDEX on the head and padding

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions over real tokens only (left padding does not shift them)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> Conversations:
        """The batch on ``device``."""
        return Conversations(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


class ConversationEncoder:
    """Tokenises (question, answer) turns in the project's LLaVA prompt format, image token expanded."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, llava: LlavaForConditionalGeneration) -> None:
        config: Any = llava.config
        vision = config.vision_config
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        with_cls = int(config.vision_feature_select_strategy == "full")
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(
            tokenizer, [], int(config.image_token_id), patches + with_cls,
            max_length=int(config.text_config.max_position_embeddings),
        )  # fmt: skip
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self._heads: dict[str, list[int]] = {}  # the scene vocabulary repeats: tokenise each text once
        self._answers: dict[str, list[int]] = {}

    def head(self, question: str) -> list[int]:
        """The prompt's ids up to ``ASSISTANT:`` (what generation starts from)."""
        if question not in self._heads:
            if len(self._heads) >= CACHE_SIZE:
                self._heads.clear()
            self._heads[question] = self.prompts.bounded_head_row(question)
        return self._heads[question]

    def answer(self, answer: str) -> list[int]:
        """`` {answer}`` then the end token (tokenised apart: the same ids as after the head)."""
        if answer not in self._answers:
            if len(self._answers) >= CACHE_SIZE:
                self._answers.clear()
            ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            self._answers[answer] = [*ids, self.eos_id]
        return self._answers[answer]

    def _pad(self, rows: list[list[int]], fill: int) -> torch.Tensor:
        length = max(len(row) for row in rows)
        return torch.tensor([[fill] * (length - len(row)) + row for row in rows], dtype=torch.long)

    def __call__(self, questions: Sequence[str], answers: Sequence[str]) -> Conversations:
        """Turns ``question -> answer`` for training (labels on the answers and end tokens)."""
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        heads = [self.head(q) for q in questions]
        replies = [self.answer(a) for a in answers]
        rows = [h + r for h, r in zip(heads, replies, strict=True)]
        labels = [[IGNORE_INDEX] * len(h) + r for h, r in zip(heads, replies, strict=True)]
        ids = self._pad(rows, self.pad_id)
        return Conversations(ids, self._pad([[1] * len(r) for r in rows], 0), self._pad(labels, IGNORE_INDEX))

    def heads(self, questions: Sequence[str]) -> Conversations:
        """The prompt heads alone, left-padded (to generate from); no labels."""
        ids = self._pad([self.head(q) for q in questions], self.pad_id)
        mask = self._pad([[1] * len(self.head(q)) for q in questions], 0)
        return Conversations(ids, mask, torch.full_like(ids, IGNORE_INDEX))


def answer_loss(llava: LlavaForConditionalGeneration, pixel_values: torch.Tensor, batch: Conversations) -> torch.Tensor:
    """Mean NLL of the labelled tokens (answers and end tokens) given the image and the prompt."""
    out = llava(
        input_ids=batch.input_ids,
        pixel_values=pixel_values,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )
    logits = out.logits[:, :-1].float()  # (B, L-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1))


@torch.no_grad()
def generate_answers(
    llava: LlavaForConditionalGeneration,
    encoder: ConversationEncoder,
    pixel_values: torch.Tensor,
    questions: Sequence[str],
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers (argmax, key-value cache) up to the end token or ``max_new_tokens``, decoded."""
    batch = encoder.heads(questions).to(pixel_values.device)
    mask, positions = batch.attention_mask, batch.position_ids
    out = llava(
        input_ids=batch.input_ids, pixel_values=pixel_values, attention_mask=mask, position_ids=positions,
        use_cache=True, logits_to_keep=1,
    )  # fmt: skip
    done = torch.zeros(len(questions), dtype=torch.bool, device=pixel_values.device)
    written: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(dim=-1)  # (B,)
        done |= token == encoder.eos_id
        if bool(done.all()):
            break
        written.append(torch.where(done, encoder.eos_id, token))
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        positions = positions[:, -1:] + 1
        out = llava(
            input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True,
        )  # fmt: skip
    texts = []
    for row in torch.stack(written, dim=1).tolist() if written else [[] for _ in questions]:
        kept = row[: row.index(encoder.eos_id)] if encoder.eos_id in row else row
        texts.append(encoder.tokenizer.decode(kept, skip_special_tokens=True))
    return texts


def normalise_answer(text: str) -> str:
    """Lower case, spaces collapsed and stripped: how answers are compared."""
    return " ".join(text.lower().split())


@dataclass
class AnswerTally:
    """Exact-match counts of generated answers, overall and per question kind."""

    right: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    def add(self, predictions: Sequence[str], answers: Sequence[str], kinds: Sequence[str]) -> None:
        """Count a batch: a prediction is right when it equals its answer after :func:`normalise_answer`."""
        for predicted, answer, kind in zip(predictions, answers, kinds, strict=True):
            self.total[kind] = self.total.get(kind, 0) + 1
            self.right[kind] = self.right.get(kind, 0) + int(normalise_answer(predicted) == normalise_answer(answer))

    def accuracy(self) -> float:
        """Right answers over all answers (0 when there are none)."""
        total = sum(self.total.values())
        return sum(self.right.values()) / total if total else 0.0

    def per_kind(self) -> dict[str, float]:
        """Accuracy of each kind counted, in the order first seen."""
        return {kind: self.right[kind] / count for kind, count in self.total.items()}


def write_export(
    llava: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    metric: dict[str, float],
    steps: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save the LLaVA, its tokenizer and ``foundation.json`` (kind ``mllm``, + ``extra``) to ``directory``."""

    def save(folder: Path) -> None:
        llava.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    return write_foundation_export(directory, "mllm", save, metric, steps, extra)
