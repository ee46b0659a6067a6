"""VIEScore per edit and over a set: SC = min(SC scores), PQ = min(PQ scores), O = sqrt(SC · PQ).

A reply that cannot be parsed is asked again (with a format reminder) up to ``parse_retries`` times,
then recorded as a failure with its reason and counted; it is never replaced by a guessed score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from insightedit.evaluation.viescore.cache import ReplyCache, reply_key
from insightedit.evaluation.viescore.judges import Judge, JudgeError, png_bytes
from insightedit.evaluation.viescore.prompts import (
    PROMPT_VERSION,
    ReplyParseError,
    parse_scores,
    pq_prompt,
    sc_prompt,
)
from insightedit.redaction import redact


@dataclass
class VIEScoreResult:
    """One edit's judge scores (0–10) or the reasons they are missing."""

    sc_scores: list[float] | None = None
    pq_scores: list[float] | None = None
    sc_error: str | None = None
    pq_error: str | None = None
    requests_sent: int = 0
    attempts: dict[str, int] = field(default_factory=dict)

    @property
    def sc(self) -> float | None:
        """SC = min of the SC scores."""
        return min(self.sc_scores) if self.sc_scores else None

    @property
    def pq(self) -> float | None:
        """PQ = min of the PQ scores."""
        return min(self.pq_scores) if self.pq_scores else None

    @property
    def overall(self) -> float | None:
        """O = sqrt(SC · PQ) on the 0–10 scale; ``None`` when either part failed."""
        if self.sc is None or self.pq is None:
            return None
        return math.sqrt(self.sc * self.pq)


@dataclass
class VIEScoreItem:
    """What the judges see for one edit."""

    source: Image.Image
    edited: Image.Image
    instruction: str


class VIEScorer:
    """Asks a judge for SC and PQ with caching, parse retries and bounded concurrency."""

    def __init__(self, judge: Judge, cache: ReplyCache | None = None, parse_retries: int = 2) -> None:
        self.judge = judge
        self.cache = cache
        self.parse_retries = parse_retries

    @property
    def label(self) -> str:
        """The judge and prompt version, printed next to every VIEScore."""
        return redact(f"{self.judge.name} ({PROMPT_VERSION})")

    def _ask(
        self, kind: str, instruction: str, images: Sequence[bytes], result: VIEScoreResult
    ) -> tuple[list[float] | None, str | None]:
        last_error = ""
        attempts = self.parse_retries + 1
        for attempt in range(attempts):
            prompt = sc_prompt(instruction, attempt) if kind == "sc" else pq_prompt(attempt)
            key = reply_key(self.judge.name, prompt, images, attempt)
            reply = self.cache.get(key) if self.cache is not None else None
            if reply is None:
                try:
                    reply = self.judge.ask(prompt, images)
                except JudgeError as error:
                    result.attempts[kind] = attempt + 1
                    return None, redact(f"judge error: {error}")
                finally:
                    result.requests_sent += 1
                if self.cache is not None:
                    self.cache.put(key, reply, self.judge.name)
            result.attempts[kind] = attempt + 1
            try:
                return parse_scores(reply, count=2), None
            except ReplyParseError as error:
                last_error = str(error)
        return None, redact(f"unparseable reply after {attempts} attempts: {last_error}")

    def score(self, item: VIEScoreItem) -> VIEScoreResult:
        """SC on (source, edited, instruction) and PQ on the edited image."""
        result = VIEScoreResult()
        source, edited = png_bytes(item.source), png_bytes(item.edited)
        result.sc_scores, result.sc_error = self._ask("sc", item.instruction, [source, edited], result)
        result.pq_scores, result.pq_error = self._ask("pq", "", [edited], result)
        return result

    def score_many(self, items: Sequence[VIEScoreItem]) -> list[VIEScoreResult]:
        """Score items in order, at most ``judge.max_concurrency`` at once."""
        workers = max(1, int(getattr(self.judge, "max_concurrency", 1)))
        if workers == 1:
            return [self.score(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self.score, items))


def aggregate_viescore(results: Sequence[VIEScoreResult]) -> dict[str, float | int | None]:
    """Means over edits: SC and PQ on 0–10, ``O/10`` = mean sqrt(min SC · min PQ) / 10; failures counted."""
    sc = [r.sc for r in results if r.sc is not None]
    pq = [r.pq for r in results if r.pq is not None]
    overall = [r.overall for r in results if r.overall is not None]
    return {
        "viescore_O/10": sum(overall) / len(overall) / 10.0 if overall else None,
        "viescore_SC": sum(sc) / len(sc) if sc else None,
        "viescore_PQ": sum(pq) / len(pq) if pq else None,
        "viescore_n_scored": len(overall),
        "viescore_n_sc_failed": sum(r.sc_error is not None for r in results),
        "viescore_n_pq_failed": sum(r.pq_error is not None for r in results),
    }
