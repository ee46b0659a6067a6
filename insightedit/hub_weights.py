"""Hub weights a config names that are not on this machine: found before anything is built, said in one line.

A config may name Hugging Face hub ids (``comprehension.pretrained: llava-hf/llava-1.5-7b-hf``,
``generation.pretrained: timbrooks/instruct-pix2pix``) or an open_clip tag (``bridging.clip_pretrained:
openai``, which open_clip fetches from the hub repo ``timm/vit_large_patch14_clip_224.openai``). When such
weights are neither a local path nor in the hub cache and cannot be downloaded (``HF_HUB_OFFLINE=1``, or the
hub cannot be reached), :func:`check_hub_weights` raises one :class:`UserError` naming every missing id and
the fix, instead of the libraries' retries and an error that names neither.

Light on purpose (no torch): the CLI checks the configs with it before the heavy imports.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insightedit.foundation_paths import check_foundation_paths

# open_clip's ``ViT-L-14`` + ``openai`` (the full preset's CLIP): the hub repo and the files open_clip reads
# from it (safetensors first). tests/test_hub_weights.py checks this against open_clip's own table.
FULL_CLIP_MODEL = "ViT-L-14"
OPENAI_CLIP_HUB = "timm/vit_large_patch14_clip_224.openai"
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
LLAVA_FILE = "config.json"  # transformers reads it first
DIFFUSERS_FILE = "unet/config.json"  # the UNet of a diffusers pipeline repo (subfolder ``unet``)


@dataclass(frozen=True)
class HubWeights:
    """Weights that come from the hub: the option that names them, its value, the repo and a file that proves them.

    ``filenames``: any one of them in the hub cache means the weights are on this machine.
    """

    option: str
    value: str
    repo_id: str
    filenames: tuple[str, ...]

    def describe(self) -> str:
        """``option=value`` (with the hub repo when the value is not the repo id itself)."""
        repo = "" if self.repo_id == self.value else f" (hub {self.repo_id})"
        return f"{self.option}={self.value}{repo}"


def _is_hub_id(value: str) -> bool:
    """Whether ``value`` would be read from the hub: not an existing path, not a ``.ckpt`` file, ``org/name``-shaped."""
    if Path(value).exists() or value.endswith(".ckpt") or "${" in value:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def clip_hub_weights(
    option: str, tag: str, model: str = FULL_CLIP_MODEL, known_only: bool = False
) -> HubWeights | None:
    """The hub repo open_clip fetches ``model``'s ``tag`` weights from (``None``: a local file, or not from the hub).

    ``known_only``: answer from this module's table only (no open_clip import, which imports torch).
    """
    if os.path.isfile(tag):
        return None
    if model == FULL_CLIP_MODEL and tag == "openai":
        return HubWeights(option, tag, OPENAI_CLIP_HUB, OPEN_CLIP_FILES)
    if known_only:
        return None
    from open_clip.pretrained import get_pretrained_cfg

    hub = (get_pretrained_cfg(model, tag) or {}).get("hf_hub", "")
    if not hub:
        return None  # an unknown tag (build_clip_image_encoder says so) or a plain URL download
    repo_id, filename = os.path.split(hub)
    files = (filename,) if filename else OPEN_CLIP_FILES
    return HubWeights(option, tag, repo_id, files)


def configured_hub_weights(init_args: Mapping[str, Any], known_only: bool = False) -> list[HubWeights]:
    """The hub weights an :class:`EditorSystem`'s ``init_args`` name (comprehension, generation, bridging's CLIP).

    ``known_only``: see :func:`clip_hub_weights`.
    """
    from insightedit.models.zoo import resolve_section_overrides

    init_args = resolve_section_overrides(init_args)  # an overlay's local folders replace the member's hub ids
    found: list[HubWeights] = []
    sections = {name: init_args.get(name) for name in ("comprehension", "generation", "bridging")}
    for name, filename in (("comprehension", LLAVA_FILE), ("generation", DIFFUSERS_FILE)):
        section = sections[name]
        value = section.get("pretrained") if isinstance(section, Mapping) else None
        if isinstance(value, str) and _is_hub_id(value):
            found.append(HubWeights(f"{name}.pretrained", value, value, (filename,)))
    bridging = sections["bridging"]
    tag = bridging.get("clip_pretrained") if isinstance(bridging, Mapping) else None
    if isinstance(tag, str) and init_args.get("preset", "tiny") == "full" and "${" not in tag:
        clip = clip_hub_weights("bridging.clip_pretrained", tag, known_only=known_only)
        if clip is not None:
            found.append(clip)
    return found


def is_cached(weights: HubWeights, cache_dir: str | Path | None = None) -> bool:
    """Whether one of ``weights.filenames`` is in the hub cache (``cache_dir``; default: huggingface_hub's)."""
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(weights.repo_id, name, cache_dir=cache_dir), str)
        for name in weights.filenames
    )


def hub_offline() -> bool:
    """Whether downloads are switched off (``HF_HUB_OFFLINE``, as huggingface_hub reads it, or in this process)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (one request, no retries), or ``None`` when it answers."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout, follow_redirects=False)
    except Exception as error:  # any failure of the client huggingface_hub uses (its errors vary by version)
        return f"{constants.ENDPOINT} cannot be reached ({type(error).__name__})"
    return None


def check_hub_weights(
    weights: Iterable[HubWeights], cache_dir: str | Path | None = None, fix: str | None = None
) -> None:
    """Raise one :class:`UserError` naming every weight not on this machine, when they cannot be downloaded.

    Nothing missing, or the hub reachable and downloads allowed: return (the libraries download them).
    ``fix``: what to do, when not the default (download, or name a local copy in the config).
    """
    missing = [item for item in weights if not is_cached(item, cache_dir)]
    if not missing:
        return
    offline = hub_offline()
    reason = "HF_HUB_OFFLINE=1 forbids downloads" if offline else hub_unreachable()
    if reason is None:
        return
    from insightedit.errors import UserError

    if fix is None:
        fix = (
            "download them where there is network (hf download REPO) or name a local copy in the config "
            f"(--model.init_args.{missing[0].option}=PATH)"
        )
        fix += "" if offline else "; with no network, HF_HUB_OFFLINE=1 answers at once"
        fix += "; see checkpoints/README.md"
    names = ", ".join(item.describe() for item in missing)
    raise UserError(f"weights not on this machine, and {reason}: {names}; {fix}")


def require_hub_weights(option: str, value: str | None, filename: str, fix: str | None = None) -> None:
    """:func:`check_hub_weights` for one ``value`` (a hub id or a local path; paths pass) read by ``option``."""
    if value is not None and _is_hub_id(str(value)):
        check_hub_weights([HubWeights(option, str(value), str(value), (filename,))], fix=fix)


def check_model_config(model: Any) -> None:
    """:func:`check_hub_weights` for a parsed ``model`` config (``class_path`` + ``init_args``; Namespace or dict)."""
    as_dict = model.as_dict() if hasattr(model, "as_dict") else model
    init_args = as_dict.get("init_args") if isinstance(as_dict, Mapping) else None
    if isinstance(init_args, Mapping):
        from insightedit.models.zoo import resolve_section_overrides

        check_foundation_paths(resolve_section_overrides(init_args))  # a tiny foundation not built yet: how to build it
        check_hub_weights(configured_hub_weights(init_args))
