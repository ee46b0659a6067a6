"""The exported model folder: what ``insightedit export`` writes and :class:`EditPipeline` reads, for any member.

Layout (format version 2; every weight file is safetensors, every config JSON)::

    model_index.json      the member, its preset and options, the default resolution, one entry per part
    <part>/               one folder per part of the member's editor, written by kind
                          (:mod:`insightedit.pipeline.parts`): e.g. comprehension/ (LLaVA base, tokenizer,
                          LoRA adapter, [MM] rows), bridging/ (sizes + Q-Former/BIM/Mapper), head/ (MGIE's
                          edit head), generation/ (UNet, image branch, scheduler, VAE, text encoder)

``model_index.json``::

    {"_class_name": "EditPipeline", "format_version": 2, "member": "insightedit", "preset": "tiny",
     "resolution": 256, "options": {"align_target": "plain_instruction"},
     "parts": {"comprehension": {"kind": "comprehension", "folder": "comprehension", "base": ...,
                                 "base_included": true, "num_mm_tokens": 8},
               "bridging": {"kind": "bridging", "folder": "bridging", "bim": true, "mapper": true},
               "generation": {"kind": "generation", "folder": "generation"}}}

Folders of format version 1 (written before the zoo: ``_class_name`` ``InsightEditPipeline``, no
``member``) have the same part folders for InsightEdit and load as member ``insightedit``.

The LLaVA base is the only part that may be *referenced* instead of included: 13.5 GB of frozen weights
identical for every fine-tune of ``llava-hf/llava-1.5-7b-hf``. A tiny model always includes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError, safe_open
from transformers.utils import logging as transformers_logging

from insightedit import __version__
from insightedit.errors import UserError
from insightedit.models.zoo import get_member
from insightedit.pipeline.parts import PART_KINDS, part_files

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "EditPipeline"
LEGACY_PIPELINE_CLASS = "InsightEditPipeline"  # format version 1
FORMAT_VERSION = 2
LEGACY_PARTS = {  # what a version-1 folder holds (InsightEdit's three parts)
    "comprehension": "comprehension",
    "bridging": "bridging",
    "generation": "generation",
}
FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No transformers/diffusers progress bars while a folder is read or written (the CLI prints one line)."""
    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()
            diffusers_logging.enable_progress_bar()


def write_model_index(
    directory: Path,
    member: str,
    preset: str,
    resolution: int | None,
    options: dict[str, Any],
    parts: dict[str, dict[str, Any]],
) -> None:
    """Write ``model_index.json``: the pipeline class, format version, member, preset, resolution, options, parts."""
    index = {
        "_class_name": PIPELINE_CLASS,
        "_insightedit_version": __version__,
        "format_version": FORMAT_VERSION,
        "member": member,
        "preset": preset,
        "resolution": resolution,
        "options": options,
        "parts": parts,
    }
    (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2, default=str) + "\n")


def _upgrade_v1(index: dict[str, Any]) -> dict[str, Any]:
    """A version-1 index in the version-2 shape: member ``insightedit`` with its three parts."""
    parts = {name: {"kind": kind, "folder": name} for name, kind in LEGACY_PARTS.items()}
    parts["comprehension"].update(index.get("comprehension") or {})
    parts["comprehension"].update(kind="comprehension", folder="comprehension")
    return {**index, "member": "insightedit", "options": {}, "parts": parts, "format_version": 1}


def _check_index(path: Path, index: dict[str, Any]) -> None:
    """The member exists and takes the options; every part has a known kind and a plain folder name."""
    member = get_member(str(index.get("member")))
    options = index.get("options")
    if not isinstance(options, dict):
        raise UserError(f"{path} gives no member options")
    unknown = sorted(set(options) - set(member.options))
    if unknown:
        raise UserError(f"{path}: member {member.name} takes no option {', '.join(unknown)}")
    parts = index.get("parts")
    if not isinstance(parts, dict) or not parts:
        raise UserError(f"{path} lists no model parts")
    for name, entry in parts.items():
        if not isinstance(entry, dict) or entry.get("kind") not in PART_KINDS:
            raise UserError(f"{path}: part {name!r} has no known kind (one of {', '.join(PART_KINDS)})")
        folder = entry.get("folder")
        if not isinstance(folder, str) or not FOLDER_NAME.fullmatch(folder):
            raise UserError(f"{path}: part {name!r} names the folder {folder!r}; a part's folder is a plain name")
        base = entry.get("base")
        if entry.get("base_included") and (
            not isinstance(base, str) or Path(base).is_absolute() or ".." in Path(base).parts
        ):
            raise UserError(f"{path}: part {name!r} includes its base at {base!r}, outside the folder")


def read_model_index(directory: str | Path) -> dict[str, Any]:
    """Read and check ``model_index.json`` and every file it implies; raise :class:`UserError` if one is bad.

    A version-1 index comes back in the version-2 shape (member ``insightedit``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"model folder {directory} not found")
    path = directory / MODEL_INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory} is not an exported InsightEdit model (no {MODEL_INDEX})") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable ({error})") from None
    if not isinstance(index, dict) or index.get("_class_name") not in (PIPELINE_CLASS, LEGACY_PIPELINE_CLASS):
        raise UserError(f"{path} does not describe an {PIPELINE_CLASS}")
    version = index.get("format_version")
    if version == 1:
        index = _upgrade_v1(index)
    elif version != FORMAT_VERSION:
        raise UserError(f"{path} has format version {version}, this code reads 1 and {FORMAT_VERSION}")
    _check_index(path, index)
    check_model_files(directory, index)
    return index


def _read_json(path: Path) -> Any:
    """A JSON file of the folder; a missing, unreadable or invalid one is a :class:`UserError` naming it."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the model folder is incomplete; export it again")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); export the model again") from None


def required_files(directory: Path, index: dict[str, Any]) -> list[Path]:
    """Every config and weight file that loading the folder of ``index`` needs (each part's, by kind)."""
    return [path for entry in index["parts"].values() for path in part_files(directory, entry, _read_json)]


def check_model_files(directory: str | Path, index: dict[str, Any]) -> None:
    """Raise :class:`UserError` naming a needed file that is missing or any JSON/safetensors file that is damaged.

    Runs before any weight is loaded; a safetensors header is checked against the file's length, so a
    truncated file is caught here (a corrupt byte inside a tensor's data is not detectable without a checksum).
    """
    directory = Path(directory)
    for path in required_files(directory, index):
        if not path.is_file():
            raise UserError(f"{path} is missing: the model folder is incomplete; export it again")
    for path in sorted(directory.rglob("*.json")):
        _read_json(path)
    for path in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path} is damaged (truncated or corrupt: {first}); export the model again") from None


__all__ = [
    "FORMAT_VERSION",
    "MODEL_INDEX",
    "PIPELINE_CLASS",
    "check_model_files",
    "quiet_progress",
    "read_model_index",
    "required_files",
    "write_model_index",
]
