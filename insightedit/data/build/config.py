"""The ``insightedit data build`` config: a backend per step, thresholds, and the predict jobs' trainer.

The yaml is validated against the dataclasses below by OmegaConf (types, unknown keys); anything wrong
becomes one :class:`~insightedit.errors.UserError` line naming the key. Top-level keys starting with
``x-`` are ignored, so a file can hold yaml anchors (``x-qwen: &qwen {...}``) that steps merge in with
``<<: *qwen``. See ``lightning_configs/data_build/`` and docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from insightedit.errors import UserError

STEP_NAMES: dict[int, str] = {1: "caption", 2: "segment", 3: "inpaint", 4: "rewrite", 5: "filter"}
CHAT_BACKENDS = ("oracle", "openai", "transformers")


@dataclass
class ChatSpec:
    """A text / vision-language backend: ``oracle``, ``openai`` (any OpenAI-compatible server) or ``transformers``.

    ``concurrency`` bounds the requests in flight per rank; ``retries`` are transport retries (429, 5xx,
    timeouts) with exponential backoff; ``parse_retries`` re-asks with a format reminder when a reply holds
    no usable JSON. ``delay_s`` makes the oracle sleep per item (to demonstrate kill-and-resume).
    """

    backend: str = "oracle"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    retries: int = 4
    timeout_s: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 1024
    path: str | None = None
    dtype: str = "float32"
    max_new_tokens: int = 512
    parse_retries: int = 2
    delay_s: float = 0.0

    def chat_spec(self) -> ChatSpec:
        """The chat fields alone (a step config subclasses this one)."""
        return ChatSpec(**{name: getattr(self, name) for name in ChatSpec.__dataclass_fields__})


@dataclass
class CaptionConfig(ChatSpec):
    """Step 1: a global caption and a JSON object list from an MLLM; ``max_objects`` per image."""

    max_objects: int = 8


@dataclass
class SegmentConfig:
    """Step 2: ``oracle`` or ``grounded_sam`` (Grounding DINO boxes → SAM masks) from local model folders."""

    backend: str = "oracle"
    grounding_dino: str | None = None
    sam: str | None = None
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    dtype: str = "float32"
    delay_s: float = 0.0


@dataclass
class InpaintConfig:
    """Step 3: ``oracle`` or ``diffusers`` (any inpainting pipeline folder) for remove / add / replace.

    ``chat`` picks replacement objects (default: step 1's backend). ``resolution`` is the long side the
    pipeline runs at (rounded to a multiple of 8); the result is resized back and pasted into the
    source inside the (dilated) mask, so pixels outside the mask stay the source's exactly.
    ``noop_every`` (oracle only) returns every n-th edit unchanged: failed edits for the filter to drop.
    """

    backend: str = "oracle"
    model: str | None = None
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    resolution: int = 512
    mask_dilation: int = 0
    remove_prompt: str = "empty background, seamless continuation of the surroundings"
    negative_prompt: str = "{object}, object, text, watermark"
    dtype: str = "float32"
    chat: ChatSpec | None = None
    delay_s: float = 0.0
    noop_every: int = 0


@dataclass
class RewriteConfig(ChatSpec):
    """Step 4: an LLM rewrites each templated instruction into a simple and a reasoning version."""


@dataclass
class FilterConfig(ChatSpec):
    """Step 5: VIEScore with this judge; a record passes when O/10 = sqrt(min SC · min PQ) / 10 >= ``threshold``."""

    threshold: float = 0.6


@dataclass
class StepsConfig:
    """One section per step."""

    caption: CaptionConfig = field(default_factory=CaptionConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class TrainerSettings:
    """``lightning.Trainer`` arguments of every predict job (the same command uses all devices and nodes)."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None


@dataclass
class BuildConfig:
    """Everything ``insightedit data build`` needs besides the image folder and the output folder.

    ``short_side`` resizes sources (short side, in pixels) before step 1; ``None`` keeps them as they
    are. ``chat_image_side`` bounds the long side of images sent to chat backends. ``batch_size`` is
    the number of image ids per predict batch. ``cache_dir`` holds chat replies (default
    ``<out>/.build/cache``).
    """

    steps: StepsConfig = field(default_factory=StepsConfig)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    seed: int = 0
    short_side: int | None = None
    chat_image_side: int = 1024
    batch_size: int = 8
    cache_dir: str | None = None


def _check_chat(spec: ChatSpec, where: str) -> None:
    if spec.backend not in CHAT_BACKENDS:
        raise UserError(f"{where}.backend: {spec.backend!r} is not one of {', '.join(CHAT_BACKENDS)}")
    if spec.backend == "openai" and not (spec.base_url and spec.model):
        raise UserError(f"{where}: the openai backend needs base_url and model")
    if spec.backend == "transformers":
        _check_folder(spec.path, f"{where}.path")
    if spec.concurrency < 1 or spec.retries < 0 or spec.parse_retries < 0:
        raise UserError(f"{where}: concurrency must be >= 1, retries and parse_retries >= 0")


def _check_folder(path: str | None, where: str) -> None:
    if not path:
        raise UserError(f"{where}: a local model folder is required")
    if not Path(path).expanduser().is_dir():
        raise UserError(f"{where}: folder {path} does not exist")


def validate(config: BuildConfig) -> BuildConfig:
    """Check what types alone cannot (backend names, required paths, ranges); raise :class:`UserError`."""
    steps = config.steps
    _check_chat(steps.caption, "steps.caption")
    _check_chat(steps.rewrite, "steps.rewrite")
    _check_chat(steps.filter, "steps.filter")
    if steps.inpaint.chat is not None:
        _check_chat(steps.inpaint.chat, "steps.inpaint.chat")
    if steps.segment.backend == "grounded_sam":
        _check_folder(steps.segment.grounding_dino, "steps.segment.grounding_dino")
        _check_folder(steps.segment.sam, "steps.segment.sam")
    elif steps.segment.backend != "oracle":
        raise UserError(f"steps.segment.backend: {steps.segment.backend!r} is not one of oracle, grounded_sam")
    if steps.inpaint.backend == "diffusers":
        _check_folder(steps.inpaint.model, "steps.inpaint.model")
    elif steps.inpaint.backend != "oracle":
        raise UserError(f"steps.inpaint.backend: {steps.inpaint.backend!r} is not one of oracle, diffusers")
    if not 0.0 <= steps.filter.threshold <= 1.0:
        raise UserError(f"steps.filter.threshold: {steps.filter.threshold} is not in [0, 1] (it applies to O/10)")
    if steps.caption.max_objects < 1 or config.batch_size < 1 or config.chat_image_side < 16:
        raise UserError("max_objects and batch_size must be >= 1, chat_image_side >= 16")
    if config.short_side is not None and config.short_side < 8:
        raise UserError(f"short_side: {config.short_side} is too small (>= 8, or null to keep sizes)")
    if steps.inpaint.resolution < 8 or steps.inpaint.num_inference_steps < 1 or steps.inpaint.mask_dilation < 0:
        raise UserError("steps.inpaint: resolution >= 8, num_inference_steps >= 1, mask_dilation >= 0")
    return config


def config_from_dict(raw: Any, source: str = "config") -> BuildConfig:
    """Validate a parsed yaml mapping into a :class:`BuildConfig`; raise :class:`UserError` on one line."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"bad config {source}: the top level is not a mapping")
    raw = {key: value for key, value in raw.items() if not str(key).startswith("x-")}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(BuildConfig), raw)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        where = f" (at {error.full_key})" if getattr(error, "full_key", None) else ""
        raise UserError(f"bad config {source}: {message}{where}") from None
    assert isinstance(config, BuildConfig)
    return validate(config)


def load_config(path: str | Path) -> BuildConfig:
    """Read and validate a build config yaml; raise :class:`UserError` on one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first = str(error).replace("\n", " ")[:200]
        raise UserError(f"bad config {path}: not valid yaml ({first})") from None
    return config_from_dict(raw, str(path))


def parse_steps(text: str) -> list[int]:
    """``"1-5"``, ``"2,3"``, ``"4"`` → sorted step numbers; raise :class:`UserError`."""
    numbers: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            first, last = int(low), int(high or low)
            numbers.update(range(first, last + 1))
    except ValueError:
        raise UserError(f"--steps {text!r}: expected ranges of 1-5 such as 1-5, 2,3 or 4") from None
    if not numbers or not numbers <= set(STEP_NAMES):
        raise UserError(f"--steps {text!r}: steps are numbered 1 to 5")
    return sorted(numbers)
