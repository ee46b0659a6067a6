"""Prompts for steps 1, 3 and 4, the readers that validate the JSON replies, and the chat-backed roles.

Each prompt asks for one JSON object and nothing else; :class:`~insightedit.data.build.chat.JsonChat`
finds the object in the reply (plain, fenced or wrapped in prose), checks it with the reader, and
re-asks with a format reminder when it is unusable.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from insightedit.data.build.chat import JsonChat
from insightedit.data.build.roles import Description, ObjectInfo, Replacement, Rewrite, clean_name
from insightedit.evaluation.viescore.judges import png_bytes

CAPTION_PROMPT = (
    "You are building an image-editing dataset. Look at the image and answer with one JSON object and "
    "nothing else, in this form:\n"
    '{"caption": "<two or three sentences describing the whole image>", "objects": [{"category": '
    '"<coarse category>", "name": "<short noun phrase naming one visible object, e.g. red bandana>", '
    '"detailed_caption": "<one sentence describing that object and where it is>"}]}\n'
    "List at most {max_objects} distinct, clearly visible objects that could be removed or replaced; "
    "give each a name that tells it apart from the others."
)

REPLACE_PROMPT = (
    "An image shows: {caption}\n"
    'One object in it is "{name}" ({detailed}). Propose one different object that could plausibly take '
    "its place, at the same position and of a similar size. Answer with one JSON object and nothing "
    'else, in this form:\n{"name": "<short noun phrase>", "detailed_caption": "<one sentence describing '
    'the new object in the scene>"}'
)

REWRITE_PROMPT = (
    "Rewrite an image-editing instruction.\n"
    "Image: {caption}\n"
    "Edit ({task}): {instruction}\n"
    "Object: {detail}\n"
    "Give (1) a simple, natural rephrasing of the instruction, and (2) a reasoning instruction that "
    "does not name the object directly but refers to it through its appearance, function or relations "
    "to other things in the image, so that carrying it out needs reasoning. Answer with one JSON object "
    'and nothing else, in this form:\n{"simple": "<instruction>", "reasoning": "<instruction>"}'
)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} is not a non-empty string")
    return " ".join(value.split())


def read_description(value: dict[str, Any], max_objects: int) -> Description:
    """Step 1's reply: a caption and up to ``max_objects`` objects with distinct cleaned names."""
    caption = _text(value.get("caption"), "caption")
    objects = value.get("objects")
    if not isinstance(objects, list):
        raise ValueError("objects is not a list")
    found: list[ObjectInfo] = []
    for item in objects:
        if not isinstance(item, dict):
            continue
        name = clean_name(item.get("name") or item.get("obj_simple_caption") or "")
        if not name or any(o.name == name for o in found):
            continue
        detail = item.get("detailed_caption") or item.get("obj_detailed_caption") or ""
        found.append(ObjectInfo(name, str(item.get("category") or ""), " ".join(str(detail).split())))
    return Description(caption, found[:max_objects])


def read_replacement(value: dict[str, Any], old: str) -> Replacement:
    """A replacement object whose cleaned name differs from ``old``."""
    name = clean_name(_text(value.get("name"), "name"))
    if not name or name == old:
        raise ValueError(f"replacement {name!r} is empty or the same object")
    detail = value.get("detailed_caption")
    return Replacement(name, " ".join(str(detail).split()) if isinstance(detail, str) and detail.strip() else name)


def read_rewrite(value: dict[str, Any]) -> Rewrite:
    """A simple instruction and one or more reasoning instructions."""
    reasoning = value.get("reasoning")
    texts = reasoning if isinstance(reasoning, list) else [reasoning]
    return Rewrite(_text(value.get("simple"), "simple"), [_text(text, "reasoning") for text in texts])


def chat_image(image: Image.Image, side: int) -> bytes:
    """PNG bytes of ``image`` with its long side at most ``side``."""
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.Resampling.BICUBIC)
    return png_bytes(image)


class ChatCaptioner:
    """Step 1 by a vision-language chat backend."""

    def __init__(self, chat: JsonChat, max_objects: int, image_side: int) -> None:
        self.chat = chat
        self.max_objects = max_objects
        self.image_side = image_side

    def setup(self, device: str) -> None:
        """Nothing to load (the chat client is built by the step)."""

    def describe(self, image_id: str, image: Image.Image) -> Description:
        """Ask for the caption and the object list."""
        prompt = CAPTION_PROMPT.replace("{max_objects}", str(self.max_objects))
        return self.chat.ask(
            prompt, [chat_image(image, self.image_side)], lambda v: read_description(v, self.max_objects)
        )


class ChatReplacer:
    """Step 3's replacement object, chosen by a (text) chat backend from the captions."""

    def __init__(self, chat: JsonChat) -> None:
        self.chat = chat

    def setup(self, device: str) -> None:
        """Nothing to load."""

    def replacement(self, image_id: str, image: Image.Image, obj: ObjectInfo, caption: str) -> Replacement:
        """Ask for a different object of similar size for the same place."""
        prompt = (
            REPLACE_PROMPT.replace("{caption}", caption)
            .replace("{name}", obj.name)
            .replace("{detailed}", obj.detailed_caption or obj.name)
        )
        return self.chat.ask(prompt, [], lambda v: read_replacement(v, obj.name))


class ChatRewriter:
    """Step 4 by a (text) chat backend."""

    def __init__(self, chat: JsonChat) -> None:
        self.chat = chat

    def setup(self, device: str) -> None:
        """Nothing to load."""

    def rewrite(self, image_id: str, record: dict[str, Any]) -> Rewrite:
        """Ask for the simple and the reasoning version of the record's first instruction."""
        task = str(record["task_type"])
        if task == "replace":
            detail = f"{record.get('detailed_caption_origin', '')} -> {record.get('detailed_caption_target', '')}"
        else:
            detail = str(record.get("detailed_caption", ""))
        prompt = (
            REWRITE_PROMPT.replace("{caption}", str(record.get("img_caption", "")))
            .replace("{task}", task)
            .replace("{instruction}", str(record["instruction"][0]))
            .replace("{detail}", detail)
        )
        return self.chat.ask(prompt, [], read_rewrite)
