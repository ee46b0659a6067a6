"""Chat backends for the text and vision-language steps, the same ones the VIEScore judge uses.

``openai`` is :class:`~insightedit.evaluation.viescore.judges.OpenAICompatibleJudge` (bounded concurrency,
retries with backoff, timeouts, the API key from an environment variable); ``transformers`` is
:class:`~insightedit.evaluation.viescore.judges.TransformersVLMJudge` for a vision-language folder, or
:class:`TransformersTextLM` for a text-only causal LM. :class:`JsonChat` adds the reply cache
(:class:`~insightedit.evaluation.viescore.cache.ReplyCache`: a rerun replays every reply and sends
nothing) and re-asks with a format reminder when a reply holds no usable JSON.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from insightedit.data.build.config import ChatSpec
from insightedit.errors import UserError
from insightedit.evaluation.viescore.cache import ReplyCache, reply_key
from insightedit.evaluation.viescore.judges import Judge, JudgeError, OpenAICompatibleJudge, TransformersVLMJudge
from insightedit.evaluation.viescore.prompts import RETRY_SUFFIX, _json_objects
from insightedit.redaction import redact

T = TypeVar("T")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StepFailure(Exception):
    """One image could not go through a step; ``str(error)`` is the one-line reason that is recorded."""


def torch_dtype(name: str) -> torch.dtype:
    """``float32`` / ``float16`` / ``bfloat16`` → the torch dtype; raise :class:`UserError`."""
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


class TransformersTextLM:
    """A local text-only chat LLM (``AutoModelForCausalLM`` + its tokenizer's chat template)."""

    max_concurrency = 1

    def __init__(self, model: Any, tokenizer: Any, name: str, max_new_tokens: int = 512) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = f"transformers:{name}"
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str, device: str, dtype: torch.dtype, max_new_tokens: int) -> TransformersTextLM:
        """Load a causal LM and its tokenizer from a local folder."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModelForCausalLM.from_pretrained(path)
        return cls(model.to(device=device, dtype=dtype).eval(), tokenizer, path, max_new_tokens)

    def ask(self, prompt: str, images: Sequence[bytes]) -> str:
        """Greedy-decode the answer to ``prompt``; a text-only model cannot take images."""
        if images:
            raise JudgeError(f"{self.name} is a text-only model and cannot look at images")
        with self._lock, torch.no_grad():
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                return_dict=True,
            ).to(self.model.device)  # fmt: skip
            output = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False)
            return str(self.tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def load_transformers_chat(spec: ChatSpec, device: str) -> Judge:
    """A vision-language model when the folder holds one, else a text-only causal LM."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    path = str(Path(spec.path or "").expanduser())
    dtype = torch_dtype(spec.dtype)
    try:
        config = AutoConfig.from_pretrained(path)
        if type(config) in AutoModelForImageTextToText._model_mapping:
            judge = TransformersVLMJudge.from_pretrained(path, device=device, max_new_tokens=spec.max_new_tokens)
            judge.model = judge.model.to(dtype)  # type: ignore[attr-defined]
            return judge
        return TransformersTextLM.from_pretrained(path, device, dtype, spec.max_new_tokens)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load chat model {path!r}: {str(error).splitlines()[0]}") from None


def make_chat(spec: ChatSpec, device: str = "cpu") -> Judge:
    """The chat client a spec names (not the oracle, which the caller builds from its scenes)."""
    if spec.backend == "openai":
        return OpenAICompatibleJudge(
            str(spec.base_url), str(spec.model), api_key_env=spec.api_key_env, timeout_s=spec.timeout_s,
            max_retries=spec.retries, max_concurrency=spec.concurrency, temperature=spec.temperature,
            max_tokens=spec.max_tokens,
        )  # fmt: skip
    if spec.backend == "transformers":
        return load_transformers_chat(spec, device)
    raise ValueError(f"no chat client for backend {spec.backend!r}")


class JsonChat:
    """Asks a chat backend for one JSON object, through the reply cache, re-asking on unusable replies.

    With ``refresh_unusable`` (``--retry-failed``) a cached reply that is unusable is asked again (and
    replaced in the cache) instead of being replayed.
    """

    def __init__(
        self, chat: Judge, cache: ReplyCache | None, parse_retries: int = 2, refresh_unusable: bool = False
    ) -> None:
        self.chat = chat
        self.cache = cache
        self.parse_retries = parse_retries
        self.refresh_unusable = refresh_unusable

    def _send(self, text: str, images: Sequence[bytes], key: str) -> str:
        try:
            reply = self.chat.ask(text, images)
        except JudgeError as error:
            raise StepFailure(redact(f"chat error: {error}")) from None
        if self.cache is not None:
            self.cache.put(key, reply, self.chat.name)
        return reply

    @staticmethod
    def _read(reply: str, read: Callable[[dict[str, Any]], T]) -> tuple[T | None, str]:
        """``(value, "")`` for the first JSON object ``read`` accepts, else ``(None, why not)``."""
        objects = [value for value in _json_objects(reply) if isinstance(value, dict)]
        problem = f"no JSON object in reply {reply.strip()[:80]!r}"
        for value in objects:
            try:
                return read(value), ""
            except (ValueError, KeyError, TypeError) as error:
                problem = f"unusable JSON ({error})"
        return None, problem

    def ask(self, prompt: str, images: Sequence[bytes], read: Callable[[dict[str, Any]], T]) -> T:
        """Return ``read(obj)`` for the first JSON object ``read`` accepts; raise :class:`StepFailure`.

        ``read`` raises ``ValueError`` (or ``KeyError`` / ``TypeError``) for an object it cannot use.
        """
        problem = "no reply"
        attempts = self.parse_retries + 1
        for attempt in range(attempts):
            text = prompt + (RETRY_SUFFIX if attempt else "")
            key = reply_key(self.chat.name, text, images, attempt)
            cached = self.cache.get(key) if self.cache is not None else None
            value, problem = self._read(cached if cached is not None else self._send(text, images, key), read)
            if value is None and cached is not None and self.refresh_unusable:
                value, problem = self._read(self._send(text, images, key), read)
            if value is not None:
                return value
        raise StepFailure(redact(f"unparseable reply after {attempts} attempts: {problem}"))
