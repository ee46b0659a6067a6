"""Named evaluation protocols: what is compared with what, at which resolution, with which metric settings.

``reason_edit`` is SmartEdit's published protocol for the Reason-Edit benchmark and reproduces the
computation of SmartEdit's ``test/metrics_evaluation.py`` (torchmetrics <= 1.4.1, transformers 4.28):
border-cropped SSIM, PIL-resized CLIP inputs. ``advancededit`` is ours for AdvancedEdit-Eval (the paper does
not publish its protocol): SmartEdit's computation applied to the record's mask and target caption, plus
edited-vs-target metrics where a target image exists. Every report carries :meth:`Protocol.describe` so
its numbers name their protocol, resolution, SSIM average, CLIP preprocessing and backbones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from insightedit.errors import UserError
from insightedit.evaluation.clip_score import CLIP_PREPROCESSING, crop_to_mask_bbox
from insightedit.evaluation.lpips import LpipsMetric
from insightedit.evaluation.metrics import (
    SSIM_IMPLEMENTATIONS,
    apply_keep,
    keep_weights,
    psnr,
    psnr_in_region,
    ssim,
    to_unit_tensor,
)
from insightedit.image_reader import load_image, to_rgb

ImageSource = Path | Image.Image
MaskSource = Path | np.ndarray | Callable[[], np.ndarray]


@dataclass(frozen=True)
class Protocol:
    """A named protocol; the strings say in words exactly what each metric compares."""

    name: str
    resolution: int
    ssim_implementation: str
    lpips_net: str
    preservation: str
    clip: str
    viescore: str
    with_target_metrics: bool
    groups: str
    clip_preprocessing: str

    def describe(self) -> dict[str, object]:
        """Everything a report must print next to this protocol's numbers."""
        info: dict[str, object] = dataclasses.asdict(self)
        info["resize"] = f"{self.resolution}x{self.resolution}, images PIL bicubic, masks PIL nearest"
        info["psnr"] = "torchmetrics PSNR in float64, data_range 1, per-image value capped at PSNR_CAP_DB"
        info["ssim"] = SSIM_IMPLEMENTATIONS[self.ssim_implementation]
        info["lpips_inputs"] = "[-1, 1]"
        info["clip_preprocess"] = CLIP_PREPROCESSING[self.clip_preprocessing]
        if self.with_target_metrics:
            info["target_metrics"] = (
                "psnr_target, ssim_target, lpips_target: the EDITED image vs the TARGET image, whole image, no mask; "
                "psnr_in_mask: EDITED vs TARGET over the edit mask's pixels only (squared error averaged over them)"
            )
        return info


_SMARTEDIT_PRESERVATION = (
    "PSNR, SSIM, LPIPS between the SOURCE image and the EDITED image, both multiplied by (1 - mask) "
    "(soft mask = mask/255), computed over the whole {r}x{r} image"
)

PROTOCOLS: dict[str, Protocol] = {
    "reason_edit": Protocol(
        name="reason_edit",
        resolution=256,
        ssim_implementation="cropped",
        lpips_net="squeeze",
        preservation=_SMARTEDIT_PRESERVATION.format(r=256) + "; mask = the benchmark's *_mask.jpg",
        clip=(
            "CLIPScore = max(100*cos, 0) of the EDITED image cropped to the mask's bounding box "
            "(SmartEdit's box: last row/column excluded) against the caption after 'CLIP:'"
        ),
        viescore="SC judge sees (source, edited) + the instruction before 'CLIP:'; PQ judge sees edited",
        with_target_metrics=False,
        groups="understanding = subsets 1-5 pooled; reasoning = subset 6 reported apart",
        clip_preprocessing="pil",
    ),
    "advancededit": Protocol(
        name="advancededit",
        resolution=256,
        ssim_implementation="cropped",
        lpips_net="squeeze",
        preservation=_SMARTEDIT_PRESERVATION.format(r=256) + "; mask = the record's object segmentation",
        clip=(
            "CLIPScore = max(100*cos, 0) of the EDITED image cropped to the mask's bounding box against "
            "the record's target_caption"
        ),
        viescore="SC judge sees (source, edited) + the record's first instruction; PQ judge sees edited",
        with_target_metrics=True,
        groups="all records pooled; per task_type (remove / add / replace) alongside",
        clip_preprocessing="pil",
    ),
}


def get_protocol(
    name: str,
    resolution: int | None = None,
    lpips_net: str | None = None,
    ssim_implementation: str | None = None,
    clip_preprocessing: str | None = None,
) -> Protocol:
    """Look up a protocol by name, optionally overriding resolution, LPIPS backbone, SSIM or CLIP preprocessing."""
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    changes: dict[str, object] = {}
    if resolution is not None:
        if resolution < 16:
            raise UserError(f"resolution {resolution} is too small (at least 16)")
        changes["resolution"] = resolution
        changes["preservation"] = protocol.preservation.replace(
            f"{protocol.resolution}x{protocol.resolution}", f"{resolution}x{resolution}"
        )
    if lpips_net is not None:
        changes["lpips_net"] = lpips_net
    if ssim_implementation is not None:
        if ssim_implementation not in SSIM_IMPLEMENTATIONS:
            raise UserError(
                f"unknown SSIM implementation {ssim_implementation!r}; choose from {', '.join(SSIM_IMPLEMENTATIONS)}"
            )
        changes["ssim_implementation"] = ssim_implementation
    if clip_preprocessing is not None:
        if clip_preprocessing not in CLIP_PREPROCESSING:
            raise UserError(
                f"unknown CLIP preprocessing {clip_preprocessing!r}; choose from {', '.join(CLIP_PREPROCESSING)}"
            )
        changes["clip_preprocessing"] = clip_preprocessing
    return dataclasses.replace(protocol, **changes) if changes else protocol


@dataclass
class EvalSample:
    """One edit to score: images as paths or PIL images, the edit mask, instruction and caption."""

    id: str
    group: str
    subset: str
    source: ImageSource
    edited: ImageSource
    mask: MaskSource
    instruction: str
    caption: str
    target: ImageSource | None = None


@dataclass
class PreparedSample:
    """A sample resized by its protocol: RGB images and a soft mask in [0, 1] at ``resolution``."""

    source: Image.Image
    edited: Image.Image
    target: Image.Image | None
    mask: np.ndarray  # (R, R) float in [0, 1]
    mask_u8: np.ndarray  # (R, R) uint8, what the bounding box is taken from


def _load_image(image: ImageSource) -> Image.Image:
    """An RGB image by the package's one reader; raise :class:`UnreadableImage` with its one-line reason."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return load_image(image, mode="RGB").image


def _load_mask(mask: MaskSource) -> Image.Image:
    """An ``L`` mask: a file by the same reader and rules as images (then luma), an array as given."""
    if isinstance(mask, Path):
        return load_image(mask, mode="L").image
    values = np.asarray(mask() if callable(mask) else mask)
    if values.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {values.shape}")
    if values.dtype == np.bool_ or values.max(initial=0) <= 1:
        values = values.astype(np.float64) * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def prepare(sample: EvalSample, protocol: Protocol) -> PreparedSample:
    """Load and resize a sample's images (bicubic) and mask (nearest) to the protocol's square resolution."""
    size = (protocol.resolution, protocol.resolution)
    source = _load_image(sample.source).resize(size, resample=Image.Resampling.BICUBIC)
    edited = _load_image(sample.edited).resize(size, resample=Image.Resampling.BICUBIC)
    target = None
    if sample.target is not None:
        target = _load_image(sample.target).resize(size, resample=Image.Resampling.BICUBIC)
    mask_u8 = np.asarray(_load_mask(sample.mask).resize(size, resample=Image.Resampling.NEAREST))
    return PreparedSample(source, edited, target, mask_u8.astype(np.float64) / 255.0, mask_u8)


def pixel_scores(prepared: PreparedSample, protocol: Protocol, lpips: LpipsMetric | None) -> dict[str, object]:
    """PSNR / SSIM / LPIPS of the protocol's pairs; ``*_target`` keys compare edited with the target image.

    ``psnr_in_mask`` is the PSNR of edited vs target over the edit mask's pixels alone (did the edit
    happen); ``None`` for an empty mask or without a target.
    """
    keep = keep_weights(prepared.mask)
    source = apply_keep(to_unit_tensor(prepared.source), keep)
    edited = apply_keep(to_unit_tensor(prepared.edited), keep)
    value = psnr(source, edited)
    scores: dict[str, object] = {
        "psnr": value.value,
        "psnr_capped": value.capped,
        "ssim": ssim(source, edited, protocol.ssim_implementation),
        "lpips": lpips(source, edited) if lpips is not None else None,
    }
    if protocol.with_target_metrics:
        if prepared.target is None:
            scores.update(
                psnr_target=None,
                psnr_target_capped=None,
                ssim_target=None,
                lpips_target=None,
                psnr_in_mask=None,
                psnr_in_mask_capped=None,
            )
        else:
            whole_edit = to_unit_tensor(prepared.edited)
            whole_target = to_unit_tensor(prepared.target)
            target_psnr = psnr(whole_edit, whole_target)
            in_mask = psnr_in_region(whole_edit, whole_target, 1.0 - keep)
            scores.update(
                psnr_target=target_psnr.value,
                psnr_target_capped=target_psnr.capped,
                ssim_target=ssim(whole_edit, whole_target, protocol.ssim_implementation),
                lpips_target=lpips(whole_edit, whole_target) if lpips is not None else None,
                psnr_in_mask=None if in_mask is None else in_mask.value,
                psnr_in_mask_capped=None if in_mask is None else in_mask.capped,
            )
    return scores


def clip_crop(prepared: PreparedSample) -> Image.Image | None:
    """The edited image cropped to the mask's bounding box (both protocols); ``None`` for an empty mask."""
    return crop_to_mask_bbox(prepared.edited, prepared.mask_u8)
