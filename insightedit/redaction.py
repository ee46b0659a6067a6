"""Secrets never reach a file or the console: :func:`redact` masks API keys and tokens in any text.

Masked are the values registered with :func:`register_secret` (the API key a judge read from its
environment variable, a key given in a URL's query), and anything that looks like a credential:
``api-key=`` / ``api_key=`` / ``key=`` / ``token=`` / ``access_token=`` query parameters, a URL's
``user:password@``, ``Authorization: Bearer …`` and JSON ``"api_key": "…"`` fields, ``sk-…`` keys and
Hugging Face / GitHub tokens. A server's error body that echoes the key is redacted before it is written
to ``report.json``, ``failures/*.json``, ``summary.json``, the reply cache or printed.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import parse_qsl, urlsplit

MASK = "***"
MIN_SECRET_LENGTH = 6  # shorter registered values would mask ordinary words

_SECRET_PARAMS = r"api[-_]?key|apikey|x-api-key|key|token|access[-_]?token|auth[-_]?token|secret|password|sig"
MASKED = rf"\g<1>{MASK}"
_CREDENTIAL_FIELDS = r"api[-_]?key|apikey|x-api-key|access[-_]?token|auth[-_]?token|client[-_]?secret|password"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # query or form parameters: ?api-key=…, &token=…
    (re.compile(rf"(?i)(?<![\w-])((?:{_SECRET_PARAMS})=)(?!\*{{3}})[^&\s#'\"<>]+"), MASKED),
    # header or JSON fields named like a credential: api-key: …, "api_key": "…"
    (re.compile(rf"(?i)(?<![\w-])([\"']?(?:{_CREDENTIAL_FIELDS})[\"']?\s*:\s*[\"']?)(?!\*{{3}})[^\s\"',}}]+"), MASKED),
    # generic names only as quoted JSON fields: "key": "…", "token": "…"
    (re.compile(r"(?i)(\"(?:key|token|secret)\"\s*:\s*\")[^\"]*"), MASKED),
    # Authorization: Bearer … (any scheme) and a bare "Bearer …"
    (
        re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)[^\s\"',}]+"),
        MASKED,
    ),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{4,}"), MASKED),
    # user:password@ in a URL
    (re.compile(r"(://[^/\s:@]+:)[^@\s/]+@"), rf"\g<1>{MASK}@"),
    # well-known token shapes: OpenAI sk-…, Hugging Face hf_…, GitHub gh?_…
    (re.compile(r"\b(sk-)[A-Za-z0-9_-]{8,}"), MASKED),
    (re.compile(r"\b(hf_)[A-Za-z0-9]{16,}"), MASKED),
    (re.compile(r"\b(gh[pousr]_)[A-Za-z0-9]{16,}"), MASKED),
)
_SECRET_QUERY_NAME = re.compile(rf"(?i)^(?:{_SECRET_PARAMS})$")

_known: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever :func:`redact` sees it from now on (in this process)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _lock:
            _known.add(value)


def register_url_secrets(url: str) -> None:
    """Register the values of a URL's credential query parameters and its password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if _SECRET_QUERY_NAME.match(name):
            register_secret(value)
    register_secret(parts.password)


def redact(text: str) -> str:
    """``text`` with every registered secret and every credential-looking token replaced by ``***``."""
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_value(value: object) -> object:
    """``value`` with :func:`redact` applied to every string in it (dict keys and values, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_value(key): redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(item) for item in value)
    return value
