"""Judge backends: any OpenAI-compatible chat-completions endpoint, or a local transformers VLM.

A judge answers ``ask(prompt, images) -> str``, images being PNG bytes. The HTTP judge sends them as
base64 data URLs, bounds concurrent requests with a semaphore, retries transport errors, 429 and 5xx
with exponential backoff, and times out. The API key comes from an environment variable and is never
logged or put in an error message: it, a key in the URL's query (``?api-key=``) and anything that looks
like a credential are masked (:func:`insightedit.redaction.redact`) in the judge's name (the report's
judge label and the reply cache) and in every error, including a server's error body that echoes it.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import httpx
from PIL import Image

from insightedit.image_reader import load_rgb
from insightedit.redaction import redact, register_secret, register_url_secrets


class JudgeError(RuntimeError):
    """The judge could not be asked (network, HTTP status, malformed response) after its retries."""


class Judge(Protocol):
    """What the VIEScore scorer needs from a judge."""

    name: str
    max_concurrency: int

    def ask(self, prompt: str, images: Sequence[bytes]) -> str:
        """Send the prompt and PNG images; return the reply text."""
        ...


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG (deterministic bytes, so cache keys are stable)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


class OpenAICompatibleJudge:
    """A chat-completions endpoint (OpenAI, vLLM, …) used as a VIEScore judge."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_concurrency: int = 4,
        temperature: float = 0.0,
        max_tokens: int = 512,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max(1, max_concurrency)
        self.temperature = temperature
        self.max_tokens = max_tokens
        register_url_secrets(self.base_url)
        url = httpx.URL(self.base_url)  # a query (``?api-key=…``) stays a query after the path is extended
        self._endpoint = url.copy_with(path=url.path.rstrip("/") + "/chat/completions") if url.query else None
        self.name = redact(f"openai-compatible:{self.base_url}:{model}")
        self._semaphore = threading.BoundedSemaphore(self.max_concurrency)
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env)
        register_secret(key)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    def __repr__(self) -> str:
        return redact(f"OpenAICompatibleJudge({self.base_url!r}, {self.model!r}, api_key_env={self.api_key_env!r})")

    def _payload(self, prompt: str, images: Sequence[bytes]) -> dict[str, object]:
        content: list[dict[str, object]] = [
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()},
            }
            for image in images
        ]
        content.append({"type": "text", "text": prompt})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    @staticmethod
    def _reply_text(body: object) -> str:
        try:
            content = body["choices"][0]["message"]["content"]  # type: ignore[index]
        except (KeyError, IndexError, TypeError) as error:
            raise JudgeError("response has no choices[0].message.content") from error
        if isinstance(content, list):  # some servers return content parts
            content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise JudgeError("response content is not text")
        return content

    def ask(self, prompt: str, images: Sequence[bytes]) -> str:
        """POST ``/chat/completions`` with retries, backoff; return the reply or raise :class:`JudgeError`."""
        payload = self._payload(prompt, images)
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with self._semaphore:
                    response = self._client.post(self._endpoint or f"{self.base_url}/chat/completions", json=payload)
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise JudgeError(redact(f"HTTP {response.status_code} from {self.base_url}: {response.text[:200]}"))
            try:
                return self._reply_text(response.json())
            except ValueError as error:
                raise JudgeError("response is not JSON") from error
        raise JudgeError(redact(f"{self.base_url} failed after {self.max_retries + 1} attempts (last: {last})"))

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()


class TransformersVLMJudge:
    """A local vision-language model (``AutoModelForImageTextToText`` + ``AutoProcessor``) used as a judge."""

    max_concurrency = 1

    def __init__(self, model: object, processor: object, name: str, max_new_tokens: int = 256) -> None:
        self.model = model
        self.processor = processor
        self.name = f"transformers:{name}"
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", max_new_tokens: int = 256) -> TransformersVLMJudge:
        """Load a chat VLM (e.g. Qwen2-VL, LLaVA) from a local folder or hub id."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from insightedit.errors import UserError

        try:
            processor = AutoProcessor.from_pretrained(path)
            model = AutoModelForImageTextToText.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load judge VLM {path!r}: {str(error).splitlines()[0]}") from error
        return cls(model, processor, name=path, max_new_tokens=max_new_tokens)

    def ask(self, prompt: str, images: Sequence[bytes]) -> str:
        """Greedy-decode the model's answer to the prompt with the images placed before it."""
        pictures = [load_rgb(image, name="judged image").image for image in images]
        content: list[dict[str, object]] = [{"type": "image", "image": picture} for picture in pictures]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        with self._lock:
            inputs = self.processor.apply_chat_template(  # type: ignore[attr-defined]
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            device = getattr(self.model, "device", None)
            if device is not None:
                inputs = inputs.to(device)
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)  # type: ignore[attr-defined]
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            return str(self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0])  # type: ignore[attr-defined]
