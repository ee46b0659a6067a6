"""PSNR and SSIM against scikit-image and an independent SciPy reference, on real photos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import skimage.data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from insightedit.evaluation.metrics import PSNR_CAP_DB, apply_keep, keep_weights, psnr, ssim, to_unit_tensor


def _photos() -> list[tuple[np.ndarray, np.ndarray]]:
    astronaut = skimage.data.astronaut()[:128, :128]
    coffee = skimage.data.coffee()[:128, :128]
    noise = np.random.default_rng(0).normal(0, 12, astronaut.shape)
    noisy = np.clip(astronaut.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return [(astronaut, noisy), (astronaut, coffee)]


def _mask() -> np.ndarray:
    mask = np.zeros((128, 128), dtype=bool)
    mask[30:90, 40:100] = True
    return mask


@pytest.mark.parametrize("pair", range(2))
def test_psnr_matches_skimage_whole_and_masked(pair: int) -> None:
    a, b = _photos()[pair]
    ours = psnr(to_unit_tensor(a), to_unit_tensor(b)).value
    reference = peak_signal_noise_ratio(a.astype(np.float64) / 255, b.astype(np.float64) / 255, data_range=1.0)
    assert abs(ours - reference) < 1e-4

    keep = keep_weights(_mask())
    masked = psnr(apply_keep(to_unit_tensor(a), keep), apply_keep(to_unit_tensor(b), keep)).value
    keep_np = (1.0 - _mask().astype(np.float64))[..., None]
    reference_masked = peak_signal_noise_ratio(a / 255.0 * keep_np, b / 255.0 * keep_np, data_range=1.0)
    assert abs(masked - reference_masked) < 1e-4
    assert masked > ours  # zeroed pixels agree, so the masked PSNR is higher (SmartEdit's convention)


def test_psnr_identical_is_capped_explicitly() -> None:
    a = to_unit_tensor(skimage.data.astronaut()[:64, :64])
    value = psnr(a, a.clone())
    assert math.isinf(value.raw) and value.capped and value.value == PSNR_CAP_DB
    near = a.clone()
    near[0, 0, 0, 0] += 1 / 255
    assert not psnr(a, near).capped


def _torchmetrics_ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM as torchmetrics defines it, written with SciPy: Gaussian 11/σ1.5, mirror padding, no crop."""
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for channel in range(3):
        x, y = a[..., channel], b[..., channel]

        def blur(image: np.ndarray) -> np.ndarray:
            return scipy.ndimage.gaussian_filter(image, sigma=1.5, truncate=3.5, mode="mirror")

        mx, my = blur(x), blur(y)
        vx = np.maximum(blur(x * x) - mx**2, 0)
        vy = np.maximum(blur(y * y) - my**2, 0)
        cxy = blur(x * y) - mx * my
        values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("pair", range(2))
@pytest.mark.parametrize("masked", [False, True])
def test_ssim_each_implementation_matches_its_reference(pair: int, masked: bool) -> None:
    a, b = (image.astype(np.float64) / 255 for image in _photos()[pair])
    if masked:
        keep = (1.0 - _mask().astype(np.float64))[..., None]
        a, b = a * keep, b * keep
    ta, tb = to_unit_tensor(a), to_unit_tensor(b)
    torchmetrics_value = ssim(ta, tb, "torchmetrics")
    assert abs(torchmetrics_value - _torchmetrics_ssim_reference(a, b)) < 1e-4

    skimage_value = ssim(ta, tb, "skimage")
    reference = structural_similarity(
        a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert abs(skimage_value - reference) < 1e-4
    # The two named SSIMs differ at the borders by more than the tolerance: the name matters.
    assert abs(torchmetrics_value - skimage_value) > 1e-4


def test_ssim_of_identical_images_is_one() -> None:
    a = to_unit_tensor(skimage.data.coffee()[:64, :64])
    assert abs(ssim(a, a.clone()) - 1.0) < 1e-9
