"""Pixel metrics on images in [0, 1]: PSNR (with an explicit cap), SSIM (named implementations), masking.

Every function takes ``(1, 3, H, W)`` float tensors in [0, 1] (see :func:`to_unit_tensor`). The masked
variants follow SmartEdit's protocol: both images are multiplied by a keep-weight map ``1 − mask`` and the
metric is computed over the whole (partly zeroed) image.

SSIM has two published averages of the same Gaussian SSIM map. torchmetrics up to 1.4.1 (what SmartEdit's
``test/metrics_evaluation.py`` ran) and scikit-image drop a border of ``(11 − 1) / 2 = 5`` pixels, where
the window reaches into padding, before the mean (``"cropped"``); torchmetrics 1.4.2 and later average the
full map, padded border included (``"torchmetrics"``). On masked 256×256 photos they differ by 1e-3 to
1e-2, more than published tables resolve, so every SSIM here is named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from insightedit.errors import UserError

# PSNR of identical images is +inf. A per-image PSNR is reported as min(PSNR, PSNR_CAP_DB) so that means
# stay finite; the number of capped images is reported next to every mean. 100 dB lies below the
# smallest non-zero 8-bit error at 256x256 (one channel of one pixel off by one step: ~101.1 dB).
PSNR_CAP_DB: float = 100.0

# Pixels cropped from each side of the SSIM map by the "cropped" SSIM: (Gaussian window 11 − 1) / 2.
SSIM_BORDER: int = 5

SSIM_IMPLEMENTATIONS: dict[str, str] = {
    "cropped": (
        "Gaussian SSIM (window 11, sigma 1.5, K1 0.01, K2 0.03, data_range 1, float64) averaged over the map "
        "with a 5 px border cropped, as torchmetrics <= 1.4.1 (SmartEdit's script) and scikit-image compute it"
    ),
    "torchmetrics": (
        "torchmetrics >= 1.4.2 structural_similarity_index_measure: Gaussian window 11, sigma 1.5, K1 0.01, "
        "K2 0.03, data_range 1, reflect (mirror) padding of 5 px, mean over the full SSIM map and channels"
    ),
    "skimage": (
        "scikit-image structural_similarity: gaussian_weights, sigma 1.5, use_sample_covariance=False, "
        "data_range 1, scipy 'reflect' filtering, 5 px border cropped before the mean (Wang et al. 2004)"
    ),
}


def to_unit_tensor(image: Image.Image | np.ndarray, dtype: torch.dtype = torch.float64) -> Tensor:
    """Convert an RGB PIL image or an ``(H, W, 3)`` uint8/float array to ``(1, 3, H, W)`` in [0, 1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    if array.dtype == np.uint8:
        values = torch.from_numpy(array.astype(np.float64) / 255.0)
    else:
        values = torch.from_numpy(array.astype(np.float64))
    return values.permute(2, 0, 1).unsqueeze(0).to(dtype)  # (1, 3, H, W)


def keep_weights(mask: np.ndarray) -> Tensor:
    """Keep weights ``1 − mask`` ``(1, 1, H, W)`` from an ``(H, W)`` edit mask (bool or float in [0, 1])."""
    values = np.asarray(mask, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {values.shape}")
    return (1.0 - torch.from_numpy(values)).clamp(0.0, 1.0)[None, None]


def apply_keep(image: Tensor, keep: Tensor) -> Tensor:
    """Multiply an image ``(1, 3, H, W)`` by keep weights ``(1, 1, H, W)`` (the unedited-region variant)."""
    if image.shape[-2:] != keep.shape[-2:]:
        raise ValueError(f"mask size {tuple(keep.shape[-2:])} differs from image size {tuple(image.shape[-2:])}")
    return image * keep.to(image.dtype)


@dataclass(frozen=True)
class PsnrValue:
    """A PSNR in dB: ``value`` = min(raw, cap); ``raw`` may be ``inf``; ``capped`` says the cap applied."""

    value: float
    raw: float
    capped: bool


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0, cap: float = PSNR_CAP_DB) -> PsnrValue:
    """PSNR between two ``(1, 3, H, W)`` images via torchmetrics; ``inf`` becomes ``cap`` explicitly."""
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    raw = float(peak_signal_noise_ratio(a, b, data_range=data_range))
    if math.isnan(raw):
        raise ValueError("PSNR is NaN: the images contain NaN values")
    return PsnrValue(value=min(raw, cap), raw=raw, capped=raw >= cap)


def psnr_in_region(a: Tensor, b: Tensor, weights: Tensor, cap: float = PSNR_CAP_DB) -> PsnrValue | None:
    """PSNR (data range 1) of two ``(1, 3, H, W)`` images over a region only; ``None`` for an empty region.

    The squared error is averaged over the region's pixels alone, weighted by ``weights`` ``(1, 1, H, W)``
    in [0, 1] (for a binary mask: the mean over the mask's pixels), unlike the protocols' masked PSNR, which
    zeroes the other pixels and averages over the whole image.
    """
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if weights.shape[-2:] != a.shape[-2:]:
        raise ValueError(f"mask size {tuple(weights.shape[-2:])} differs from image size {tuple(a.shape[-2:])}")
    weights = weights.to(torch.float64)
    total = float(weights.sum()) * a.shape[1]
    if total <= 0:
        return None
    error = float((((a.double() - b.double()) ** 2) * weights).sum()) / total
    if math.isnan(error):
        raise ValueError("PSNR is NaN: the images contain NaN values")
    raw = math.inf if error <= 0 else -10.0 * math.log10(error)
    return PsnrValue(value=min(raw, cap), raw=raw, capped=raw >= cap)


def _ssim_map(a: Tensor, b: Tensor) -> Tensor:
    """The Gaussian SSIM map of torchmetrics ``(1, 3, H, W)`` (window 11, sigma 1.5, data_range 1, reflect padding)."""
    _, full_map = structural_similarity_index_measure(
        a, b, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0, k1=0.01, k2=0.03, return_full_image=True
    )
    return full_map


def ssim(a: Tensor, b: Tensor, implementation: str = "cropped") -> float:
    """SSIM between two ``(1, 3, H, W)`` images with a named implementation (:data:`SSIM_IMPLEMENTATIONS`)."""
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if implementation in ("cropped", "torchmetrics"):
        if min(a.shape[-2:]) <= 2 * SSIM_BORDER:
            raise ValueError(f"SSIM needs images larger than {2 * SSIM_BORDER} px, got {tuple(a.shape[-2:])}")
        # float64 on purpose: in float32, E[x²] − μ² cancels badly on flat regions and identical images
        # score 0.9996; identical inputs are exactly 1 by definition, so skip the (slow) float64 filter then
        if torch.equal(a, b):
            return 1.0
        full_map = _ssim_map(a.double(), b.double())
        if implementation == "cropped":
            full_map = full_map[..., SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER]
        return float(full_map.mean())
    if implementation == "skimage":
        try:
            from skimage.metrics import structural_similarity
        except ImportError as error:
            raise UserError("SSIM implementation 'skimage' needs scikit-image: pip install scikit-image") from error
        first = a[0].permute(1, 2, 0).double().cpu().numpy()
        second = b[0].permute(1, 2, 0).double().cpu().numpy()
        return float(
            structural_similarity(
                first,
                second,
                data_range=1.0,
                channel_axis=2,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
        )
    raise UserError(f"unknown SSIM implementation {implementation!r}; choose from {sorted(SSIM_IMPLEMENTATIONS)}")
