r"""Prompts for the comprehension module: chat template + image + instruction, answered by the [MM] tokens.

Every edit is one LLaVA-1.5 turn, ``USER: <image>\n{instruction} ASSISTANT: [MM0]...[MM{r-1}]``, built
with the tokenizer's own chat template (the model's format; :data:`LLAVA_15_CHAT_TEMPLATE` when the
tokenizer has none). The [MM] tokens are the teacher-forced answer in training and at inference alike:
``h`` is read at their positions and ``L_LLM`` is the NLL of predicting them (labels -100 elsewhere).
The single ``<image>`` token is expanded to one token per vision patch, as ``LlavaProcessor`` does.

A prompt may also carry an explicit answer text before the [MM] tokens (MGIE's "expressive
instruction"): ``USER: <image>\n{instruction} ASSISTANT: {answer} [MM0]...[MM{r-1}]``; its tokens are
then labelled too, so ``L_LLM`` is the NLL of the text and the [MM] tokens. :meth:`PromptEncoder.heads`
gives the prompts without an answer (``... ASSISTANT:``), to generate one from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
# An over-long instruction is first cut to budget x this many characters (no token is longer), so that
# tokenising a 100 kB instruction stays cheap; the token cut that follows is exact.
MAX_CHARS_PER_TOKEN = 16
# tokenizers without a real limit report a huge model_max_length (int(1e30))
NO_LIMIT = 10**9

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), accepting llava-hf's message schema
# (content as a string or a list of {"type": "image"} / {"type": "text", "text": ...} items).
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass
class EncodedPrompts:
    """A padded batch of prompts with the [MM] positions and the ``L_LLM`` labels."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    mm_mask: torch.Tensor  # (B, L) bool, True at the r [MM] positions of each row
    labels: torch.Tensor  # (B, L) long, the answer's and [MM] ids at their positions, IGNORE_INDEX elsewhere

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted over real tokens only, so left and right padding give the same result."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)


class PromptEncoder:
    """Turns instructions into LLaVA prompts answered by the [MM] tokens, tokenised and padded.

    Every prompt fits ``max_length`` tokens (the smaller of the argument, e.g. the language model's
    ``max_position_embeddings``, and the tokenizer's ``model_max_length``): an instruction that would not
    fit is cut to the tokens that do, with a warning, and counted in :attr:`truncated`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mm_tokens: Sequence[str],
        image_token_id: int,
        num_image_tokens: int,
        max_length: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.mm_tokens = list(mm_tokens)
        self.mm_token_ids = tokenizer.convert_tokens_to_ids(self.mm_tokens)
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = LLAVA_15_CHAT_TEMPLATE
        self.answer = " " + "".join(self.mm_tokens)
        limits = [int(n) for n in (max_length, getattr(tokenizer, "model_max_length", None)) if n and n < NO_LIMIT]
        self.max_length = min(limits) if limits else None
        self.truncated = 0
        self.instruction_budget: int | None = None
        if self.max_length is not None:
            empty = len(self._row(""))
            self.instruction_budget = self.max_length - empty
            if self.instruction_budget < 1:
                raise ValueError(f"max_length {self.max_length} leaves no room for an instruction ({empty} tokens)")

    def prompt(self, instruction: str, answer: str = "") -> str:
        """The full text of one turn: the chat-templated user message with the image, ``answer``, the [MM] tokens."""
        reply = f" {answer}" if answer else ""
        return self.head(instruction) + reply + self.answer

    def head(self, instruction: str) -> str:
        """The chat-templated user message with the image, up to the assistant's turn (no answer)."""
        content: Any = [{"type": "image"}, {"type": "text", "text": instruction}]
        try:
            head = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        except TypeError:  # a text-only (Vicuna-style) template: the image token goes into the text
            text = f"{IMAGE_TOKEN}\n{instruction}"
            head = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return str(head)

    def _expand_image(self, ids: list[int]) -> list[int]:
        """Replace the single image token by ``num_image_tokens`` copies (one per vision patch)."""
        where = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(where) != 1:
            raise ValueError(f"a prompt must hold exactly one image token, found {len(where)}")
        i = where[0]
        return ids[:i] + [self.image_token_id] * self.num_image_tokens + ids[i + 1 :]

    def _row(self, instruction: str, answer: str = "") -> list[int]:
        """The token ids of one prompt, image token expanded."""
        return self._expand_image(self.tokenizer(self.prompt(instruction, answer))["input_ids"])

    def _head_row(self, instruction: str) -> list[int]:
        """The token ids of one prompt without its answer, image token expanded."""
        return self._expand_image(self.tokenizer(self.head(instruction))["input_ids"])

    def _fit(self, text: str, row_of: Callable[[str], list[int]], budget: int, what: str) -> tuple[str, list[int]]:
        """``text`` cut (by tokens) where needed so that ``row_of(text)`` fits ``max_length``; and that row."""
        assert self.max_length is not None
        original = text
        text = text[: budget * MAX_CHARS_PER_TOKEN]
        row = row_of(text)
        if len(row) > self.max_length:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = min(budget, len(ids) - 1)
            for _ in range(8):  # decoding then re-tokenising can merge or split a token at the cut: shrink, retry
                text = self.tokenizer.decode(ids[: max(keep, 0)])
                row = row_of(text)
                if len(row) <= self.max_length:
                    break
                keep -= len(row) - self.max_length
            else:
                raise ValueError(f"cannot fit an {what} of {len(original)} characters in {self.max_length} tokens")
        if text != original:
            self.truncated += 1
            log.warning(
                "%s of %d characters cut to %d characters so its prompt fits %d tokens",
                what, len(original), len(text), self.max_length,
            )  # fmt: skip
        return text, row

    def bounded_instruction(self, instruction: str) -> tuple[str, list[int]]:
        """The instruction, cut where needed so its prompt fits ``max_length``, and that prompt's token ids."""
        if self.max_length is None or self.instruction_budget is None:
            return instruction, self._row(instruction)
        return self._fit(instruction, self._row, self.instruction_budget, "instruction")

    def bounded_row(self, instruction: str, answer: str = "") -> list[int]:
        """The token ids of one prompt, the instruction (then the answer) cut where needed to fit ``max_length``."""
        return self._bounded(instruction, answer)[0]

    def _bounded(self, instruction: str, answer: str) -> tuple[list[int], int]:
        """:meth:`bounded_row` and where its labels start: after the head with an answer, else at the [MM] tokens."""
        text, row = self.bounded_instruction(instruction)
        if answer:
            if self.max_length is None:
                row = self._row(text, answer)
            else:
                budget = max(self.max_length - len(row), 0)
                row = self._fit(answer, lambda reply: self._row(text, reply), budget, "answer")[1]
        start = _common_prefix(row, self._head_row(text)) if answer else len(row) - len(self.mm_tokens)
        return row, start

    def bounded_head_row(self, instruction: str) -> list[int]:
        """The token ids of one prompt without its answer, the instruction cut as in :meth:`bounded_row`."""
        return self._head_row(self.bounded_instruction(instruction)[0])

    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows padded to one length: ``input_ids`` and ``attention_mask`` (B, L)."""
        length = max(len(row) for row in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(length - len(row), length) if left else slice(0, len(row))
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, span] = 1
        return input_ids, attention_mask

    def heads(self, instructions: Sequence[str], device: torch.device | str | None = None) -> EncodedPrompts:
        """The prompts without answer nor [MM] tokens, padded on the left (to generate from); no labels."""
        if isinstance(instructions, str):
            raise TypeError("instructions must be a sequence of strings, not one string")
        input_ids, attention_mask = self._pad([self.bounded_head_row(text) for text in instructions], left=True)
        nothing = torch.zeros_like(input_ids, dtype=torch.bool)
        batch = EncodedPrompts(input_ids, attention_mask, nothing, torch.full_like(input_ids, IGNORE_INDEX))
        return batch if device is None else EncodedPrompts(*(t.to(device) for t in vars(batch).values()))

    def __call__(
        self,
        instructions: Sequence[str],
        device: torch.device | str | None = None,
        answers: Sequence[str] | None = None,
    ) -> EncodedPrompts:
        """Encode a batch of instructions; every row holds the r [MM] tokens exactly once, in order.

        ``answers``: a text per row that precedes the [MM] tokens and is labelled with them (``None``:
        the [MM] tokens alone).
        """
        if isinstance(instructions, str) or isinstance(answers, str):
            raise TypeError("instructions and answers must be sequences of strings, not one string")
        if answers is not None and len(answers) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers")
        replies = list(answers) if answers is not None else [""] * len(instructions)
        bounded = [self._bounded(text, reply) for text, reply in zip(instructions, replies, strict=True)]
        rows = [row for row, _ in bounded]
        left = self.tokenizer.padding_side == "left"
        input_ids, attention_mask = self._pad(rows, left)
        length = input_ids.shape[1]
        mm_ids = torch.tensor(self.mm_token_ids, dtype=torch.long)
        mm_mask = torch.isin(input_ids, mm_ids) & attention_mask.bool()
        counts_ok = bool((mm_mask.sum(dim=1) == len(mm_ids)).all())
        if not counts_ok or not torch.equal(input_ids[mm_mask].view(len(rows), -1), mm_ids.expand(len(rows), -1)):
            raise ValueError("each prompt must end with the [MM] tokens exactly once (is one in the instruction?)")
        labelled = mm_mask.clone()
        for b, (row, start) in enumerate(bounded):
            if replies[b]:  # every token after the shared head: the answer, then the [MM] tokens
                offset = length - len(row) if left else 0
                labelled[b, offset + start : offset + len(row)] = True
        labels = torch.where(labelled, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        batch = EncodedPrompts(input_ids, attention_mask, mm_mask, labels)
        if device is not None:
            batch = EncodedPrompts(*(t.to(device) for t in (input_ids, attention_mask, mm_mask, labels)))
        return batch


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
