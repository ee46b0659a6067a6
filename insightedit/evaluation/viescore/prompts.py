"""Our SC and PQ judge prompts (following VIEScore's rubric) and the parser for the judges' replies.

SC (semantic consistency) shows the judge the source and the edited image with the instruction and asks
for two scores: how well the edit follows the instruction, and how little else changed (over-editing).
PQ (perceptual quality) shows the edited image alone and asks for naturalness and absence of artifacts.
Scores are 0–10; the reply is a JSON object ``{"score": [a, b], "reasoning": "..."}``.
"""

from __future__ import annotations

import json
import math
import re

PROMPT_VERSION = "insightedit-viescore-v1"

_OUTPUT_RULE = (
    "Answer with one JSON object and nothing else, in this form:\n"
    '{"score": [<first score>, <second score>], "reasoning": "<one or two sentences>"}\n'
    "Both scores are numbers from 0 to 10."
)

SC_TEMPLATE = (
    "You are a strict judge of image edits. You will see two images: first the ORIGINAL image, then the "
    "EDITED image that an editing system produced from it for this instruction:\n"
    "INSTRUCTION: {instruction}\n\n"
    "Give two scores.\n"
    "1. Editing success, 0 to 10: 0 means the edited image does not carry out the instruction at all; 10 "
    "means it carries out exactly what the instruction asks.\n"
    "2. Over-editing, 0 to 10: 0 means the edited image no longer looks like the original (scene, objects "
    "or layout changed beyond the instruction); 10 means everything the instruction does not touch is "
    "unchanged, a minimal yet effective edit.\n"
    "Judge only what you see; do not reward effort or style.\n\n" + _OUTPUT_RULE
)

PQ_TEMPLATE = (
    "You are a strict judge of image quality. You will see one image produced by an image editing system.\n"
    "Give two scores.\n"
    "1. Naturalness, 0 to 10: 0 means the image looks clearly unnatural (wrong lighting, shadows, scale, "
    "perspective or impossible content); 10 means it looks like a natural, coherent photograph or picture.\n"
    "2. Artifacts, 0 to 10: 0 means heavy artifacts (distortion, blur, noise, broken or smeared regions, "
    "watermarks); 10 means no visible artifacts.\n"
    "Judge only the image itself, not whether it matches any instruction.\n\n" + _OUTPUT_RULE
)

RETRY_SUFFIX = "\n\nYour previous answer could not be read. Reply with the JSON object only."


class ReplyParseError(ValueError):
    """A judge reply that does not contain the expected scores."""


def sc_prompt(instruction: str, attempt: int = 0) -> str:
    """The SC prompt for an instruction; attempts after the first add a reminder about the format."""
    return SC_TEMPLATE.replace("{instruction}", instruction.strip()) + (RETRY_SUFFIX if attempt else "")


def pq_prompt(attempt: int = 0) -> str:
    """The PQ prompt; attempts after the first add a reminder about the format."""
    return PQ_TEMPLATE + (RETRY_SUFFIX if attempt else "")


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def _json_objects(text: str) -> list[object]:
    """Every JSON object in ``text``: fenced blocks first, then objects embedded in prose."""
    candidates = [block.strip() for block in _FENCE.findall(text)] + [text]
    decoder = json.JSONDecoder()
    objects: list[object] = []
    for candidate in candidates:
        for start in [i for i, char in enumerate(candidate) if char == "{"]:
            try:
                value, _ = decoder.raw_decode(candidate[start:])
            except json.JSONDecodeError:
                continue
            objects.append(value)
    return objects


def _as_score(value: object) -> float:
    if isinstance(value, bool):
        raise ReplyParseError(f"score {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError as error:
            raise ReplyParseError(f"score {value!r} is not a number") from error
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ReplyParseError(f"score {value!r} is not a finite number")
    if not 0 <= value <= 10:
        raise ReplyParseError(f"score {value} is outside 0-10")
    return float(value)


def parse_scores(reply: str, count: int = 2) -> list[float]:
    """Read ``count`` scores in 0–10 from a reply (plain, fenced or prose-wrapped JSON) or raise."""
    last_error: ReplyParseError | None = None
    for value in _json_objects(reply):
        if not isinstance(value, dict):
            continue
        scores = value.get("score", value.get("scores"))
        if not isinstance(scores, list):
            last_error = ReplyParseError("JSON object has no 'score' list")
            continue
        if len(scores) != count:
            last_error = ReplyParseError(f"expected {count} scores, got {len(scores)}")
            continue
        try:
            return [_as_score(score) for score in scores]
        except ReplyParseError as error:
            last_error = error
    if last_error is not None:
        raise last_error
    raise ReplyParseError(f"no JSON object in reply: {reply.strip()[:120]!r}")
