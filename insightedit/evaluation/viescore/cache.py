"""On-disk cache of judge replies keyed by a hash of (judge, prompt, images, attempt).

A rerun over the same predictions replays every reply, unparseable ones included, and sends nothing.
Transport failures are not cached, so a rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from insightedit.redaction import redact


def reply_key(judge: str, prompt: str, images: Sequence[bytes], attempt: int) -> str:
    """SHA-256 over the judge id, the prompt, each image's bytes and the attempt number."""
    digest = hashlib.sha256()
    for part in (judge.encode(), prompt.encode(), str(attempt).encode()):
        digest.update(hashlib.sha256(part).digest())
    for image in images:
        digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()


class ReplyCache:
    """Replies stored as ``<root>/<key[:2]>/<key>.json``; writes are atomic."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached reply for ``key``, or ``None``."""
        path = self._path(key)
        if not path.is_file():
            return None
        return str(json.loads(path.read_text(encoding="utf-8"))["reply"])

    def put(self, key: str, reply: str, judge: str) -> None:
        """Store a reply (with the judge id, for people reading the cache); secrets in either are masked."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump({"judge": redact(judge), "reply": redact(reply)}, stream)
        os.replace(temporary, path)
