"""Protocols named after papers reproduce the published computation (SmartEdit's test/metrics_evaluation.py).

The references below re-implement SmartEdit's script step by step (PIL resizes, soft JPEG mask, float32
images, border-cropped SSIM = scikit-image = torchmetrics <= 1.4.1, PSNR in numpy, CLIP inputs resized
with PIL) independently of the library; the photos are the real AdvancedEdit sample (skipped if absent).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image
from skimage.metrics import structural_similarity
from test_eval_support import build_tiny_clip, photo
from torchmetrics.functional.image import structural_similarity_index_measure

from insightedit.errors import UserError
from insightedit.evaluation.clip_score import ClipScorer, pil_clip_pixels
from insightedit.evaluation.metrics import ssim, to_unit_tensor
from insightedit.evaluation.protocols import PROTOCOLS, get_protocol
from insightedit.evaluation.runner import EvalOptions, evaluate, load_scorers

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "advancededit-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="official AdvancedEdit sample not present")
SIZE = 256  # SmartEdit's metrics_size
CAPTION = "green cup"  # words the tiny CLIP tokenizer knows; a positive score for the crops below


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _perturbed(image: Image.Image, seed: int) -> Image.Image:
    """Noise everywhere and a brighter top third: a non-trivial 'edit' of the unedited region."""
    values = np.asarray(image).astype(np.int16) + np.random.default_rng(seed).integers(-12, 13, (*image.size[::-1], 3))
    values[: image.height // 3] += 20
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[tuple[Path, Path, Path]]]:
    """A Reason-Edit folder built from the real sample and SmartEdit-layout predictions; (source, mask, edited)."""
    from pycocotools import mask as mask_utils

    root = tmp_path_factory.mktemp("published")
    targets = SAMPLE / "3_editing_pair_construction"
    removed = Image.open(targets / "remove_add/target_imgs/1543_3_acoustic_guitar.png").convert("RGB")
    replaced = Image.open(targets / "replace/target_imgs/1543_3_acoustic_guitar_to_electric_guitar.png").convert("RGB")
    with Image.open(SAMPLE / "0_source_img/1543.jpg") as opened:  # 5616x3744; the targets are 960x640
        opened.draft("RGB", removed.size)  # decode at 1/4 scale (1404x936): 16x less work
        source = opened.convert("RGB").resize(removed.size, Image.Resampling.BICUBIC)
    annotations = json.loads((SAMPLE / "2_mask_generation/1543.json").read_text())["annotations"]
    guitar = next(a for a in annotations if a["class_name"] == "acoustic guitar")
    mask = Image.fromarray(mask_utils.decode(guitar["segmentation"]) * 255, mode="L")
    mask = mask.resize(removed.size, Image.Resampling.NEAREST)
    edits = {  # subset folder -> edited images, one benchmark entry each
        "1-Left-Right": [removed, _perturbed(replaced, 0)],
        "6-Reasoning": [replaced],
    }
    outputs = {
        "1-Left-Right": ("Left_Right_text.txt", "LeftRight_metrics_1"),
        "6-Reasoning": ("Reason_test.txt", "Reasoning_metrics_1"),
    }
    entries = []
    for folder, edited_images in edits.items():
        text_file, output = outputs[folder]
        (root / "bench" / folder).mkdir(parents=True)
        (root / "pred" / output).mkdir(parents=True)
        for index, edited in enumerate(edited_images):
            stem = f"{index + 1:03d}"
            paths = (root / "bench" / folder / f"{stem}.png", root / "bench" / folder / f"{stem}_mask.jpg")
            source.save(paths[0], compress_level=1)
            mask.save(paths[1], quality=95)  # soft edges, as the benchmark's JPEG masks have
            edited.save(root / "pred" / output / f"{stem}.png", compress_level=1)
            entries.append((*paths, root / "pred" / output / f"{stem}.png"))
        lines = [f"make it red CLIP: {CAPTION}"] * len(edited_images)
        (root / "bench" / folder / text_file).write_text("\n".join(lines) + "\n")
    return root / "bench", root / "pred", entries


def _smartedit_inputs(source: Path, mask: Path, edited: Path) -> tuple[np.ndarray, np.ndarray, Image.Image, np.ndarray]:
    """SmartEdit's script up to the metrics: 256² bicubic images, nearest mask, float32 images × (1 − mask/255)."""
    original = Image.open(source).convert("RGB").resize((SIZE, SIZE), resample=Image.Resampling.BICUBIC)
    edited_image = Image.open(edited).convert("RGB").resize((SIZE, SIZE), resample=Image.Resampling.BICUBIC)
    mask_image = Image.open(mask).convert("L").resize((SIZE, SIZE), resample=Image.Resampling.NEAREST)
    keep = (1 - np.asarray(mask_image, dtype=np.int64) / 255)[:, :, np.newaxis].repeat(3, axis=2).astype(np.float32)
    first = np.array(original).astype(np.float32) / 255 * keep
    second = np.array(edited_image).astype(np.float32) / 255 * keep
    return first, second, edited_image, np.array(mask_image)


def _full_map_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """torchmetrics >= 1.4.2's SSIM in SciPy: Gaussian 11/σ1.5 with mirror padding, mean over the whole map."""

    def blur(image: np.ndarray) -> np.ndarray:
        return scipy.ndimage.gaussian_filter(image, sigma=(1.5, 1.5, 0), truncate=3.5, mode="mirror")

    a, b = a.astype(np.float64), b.astype(np.float64)
    mx, my = blur(a), blur(b)
    vx, vy, cxy = np.maximum(blur(a * a) - mx**2, 0), np.maximum(blur(b * b) - my**2, 0), blur(a * b) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return float(np.mean(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


def _reference_psnr_ssim(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """PSNR (data range 1) in numpy; SSIM as torchmetrics <= 1.4.1 computed it, via scikit-image."""
    a, b = first.astype(np.float64), second.astype(np.float64)
    psnr = 10 * np.log10(1.0 / np.mean((a - b) ** 2))
    value = structural_similarity(
        a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    return float(psnr), float(value)


@functools.cache
def _clip_parts(folder: Path) -> tuple:
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _reference_pixels(image: Image.Image, size: int = 32, crop: int = 32) -> np.ndarray:
    """transformers 4.28's CLIPImageProcessor, written with PIL and numpy: short side → size, floor centre crop."""
    width, height = image.size
    new = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    resized = np.asarray(image.convert("RGB").resize(new, Image.Resampling.BICUBIC), dtype=np.float64)
    top, left = (resized.shape[0] - crop) // 2, (resized.shape[1] - crop) // 2
    values = resized[top : top + crop, left : left + crop] / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    return ((values - mean) / std).transpose(2, 0, 1)


def _reference_clip_score(folder: Path, image: Image.Image, text: str) -> float:
    """max(100 · cos, 0) via CLIPModel.forward on the reference pixels (torchmetrics' CLIPScore formula)."""
    model, tokenizer = _clip_parts(folder)
    tokens = tokenizer([text], return_tensors="pt")
    pixels = torch.from_numpy(_reference_pixels(image)).float()[None]
    with torch.no_grad():
        output = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        cosine = float(output.logits_per_image[0, 0] / model.logit_scale.exp())
    return max(100.0 * cosine, 0.0)


def _smartedit_crop(edited_image: Image.Image, mask_array: np.ndarray) -> Image.Image:
    ys, xs = np.where(mask_array)
    return edited_image.crop((np.min(xs), np.min(ys), np.max(xs), np.max(ys)))


def test_paper_protocols_pin_the_published_computation() -> None:
    for name in ("reason_edit", "advancededit"):
        protocol = get_protocol(name)
        assert (protocol.ssim_implementation, protocol.clip_preprocessing) == ("cropped", "pil")
        info = protocol.describe()
        assert "5 px border cropped" in str(info["ssim"]) and "torchmetrics <= 1.4.1" in str(info["ssim"])
        assert str(info["clip_preprocess"]).startswith("PIL bicubic resize of the short side")
    full = get_protocol("reason_edit", ssim_implementation="torchmetrics", clip_preprocessing="processor")
    assert (full.ssim_implementation, full.clip_preprocessing) == ("torchmetrics", "processor")
    assert PROTOCOLS["reason_edit"].ssim_implementation == "cropped"  # the override did not leak
    with pytest.raises(UserError, match=r"^unknown CLIP preprocessing 'opencv'; choose from pil, processor$"):
        get_protocol("reason_edit", clip_preprocessing="opencv")
    with pytest.raises(UserError, match=r"^unknown SSIM implementation 'full'; choose from cropped, torchmetrics"):
        get_protocol("reason_edit", ssim_implementation="full")


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_cropped_ssim_equals_scikit_image_and_full_map_is_torchmetrics_mean(name: str) -> None:
    a = np.asarray(photo(name, 64)).astype(np.float64) / 255
    b = np.asarray(_perturbed(photo(name, 64), 2)).astype(np.float64) / 255
    ta, tb = to_unit_tensor(a), to_unit_tensor(b)
    reference = structural_similarity(
        a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert abs(ssim(ta, tb) - reference) < 1e-12  # default = "cropped"
    assert abs(ssim(ta, tb, "cropped") - reference) < 1e-12
    full_mean = float(structural_similarity_index_measure(ta, tb, data_range=1.0))
    assert abs(ssim(ta, tb, "torchmetrics") - full_mean) < 1e-12
    assert abs(full_mean - reference) > 1e-3  # at 64 px the border is a third of the map: the name matters
    with pytest.raises(ValueError, match=r"^SSIM needs images larger than 10 px, got \(10, 10\)$"):
        ssim(ta[..., :10, :10], tb[..., :10, :10])


@needs_sample
def test_reason_edit_reproduces_smartedit_metrics_on_real_photos(benchmark, tiny_clip: Path) -> None:
    data, predictions, entries = benchmark
    options = EvalOptions(protocol="reason_edit", lpips="none", clip_model=str(tiny_clip))
    report = evaluate(data, predictions, options, layout="smartedit")
    assert report["counts"]["scored"] == 3 and report["protocol"]["ssim_implementation"] == "cropped"
    rows = {row["id"]: row for row in report["rows"]}
    gaps = []
    for record_id, (source, mask, edited) in zip(sorted(rows), entries, strict=True):
        first, second, edited_image, mask_array = _smartedit_inputs(source, mask, edited)
        psnr, value = _reference_psnr_ssim(first, second)
        row = rows[record_id]
        assert abs(row["psnr"] - psnr) < 1e-4 and not row["psnr_capped"]
        assert abs(row["ssim"] - value) < 1e-4
        clip = _reference_clip_score(tiny_clip, _smartedit_crop(edited_image, mask_array), CAPTION)
        assert clip > 10 and abs(row["clip"] - clip) < 1e-4
        gaps.append(_full_map_ssim(first, second) - value)
    # non-trivial pairs: the unedited region changed, by different amounts
    assert 20 < min(row["psnr"] for row in rows.values()) < max(row["psnr"] for row in rows.values()) < 40
    # torchmetrics >= 1.4.2's full-map mean would be off by more than 1e-3 on every one of them
    assert min(gaps) > 1e-3, gaps


@needs_sample
def test_pil_clip_preprocessing_matches_reference_on_real_crops(benchmark, tiny_clip: Path) -> None:
    _, _, entries = benchmark
    _, _, edited_image, mask_array = _smartedit_inputs(*entries[0])
    crops = [
        _smartedit_crop(edited_image, mask_array),  # the protocol's guitar crop
        edited_image,  # square
        edited_image.crop((0, 0, 50, 37)),  # 43 x 32 after resize: odd margin, floor vs round differs
        edited_image.crop((10, 20, 40, 120)),  # portrait
    ]
    scorer = ClipScorer.from_pretrained(tiny_clip)
    assert scorer.preprocessing == "pil"
    pixels = pil_clip_pixels(crops, scorer.image_processor)
    for crop, ours in zip(crops, pixels, strict=True):
        assert ours.dtype == torch.float32 and tuple(ours.shape) == (3, 32, 32)
        assert np.abs(ours.numpy() - _reference_pixels(crop)).max() < 1e-5
    try:
        from transformers import CLIPImageProcessorPil  # transformers 5's PIL backend: a second reference
    except ImportError:
        pass
    else:
        library = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        expected = library(images=crops, return_tensors="pt")["pixel_values"]
        assert torch.allclose(pixels, expected, atol=1e-5)
    processor = ClipScorer.from_pretrained(tiny_clip, preprocessing="processor")
    gaps = []
    for crop in crops:
        reference = _reference_clip_score(tiny_clip, crop, CAPTION)
        assert abs(scorer.score(crop, CAPTION) - reference) < 1e-4
        gaps.append(abs(processor.score(crop, CAPTION) - reference))
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:  # torchvision's bicubic is not PIL's
        assert max(gaps) > 1e-3, gaps


def test_clip_preprocessing_follows_the_protocol(tiny_clip: Path) -> None:
    for choice in ("pil", "processor"):
        protocol = get_protocol("reason_edit", clip_preprocessing=choice)
        scorers = load_scorers(protocol, EvalOptions("reason_edit", lpips="none", clip_model=str(tiny_clip)))
        assert scorers.clip is not None and scorers.clip.preprocessing == choice
    with pytest.raises(UserError, match=r"^unknown CLIP preprocessing 'torch'; choose from pil, processor$"):
        ClipScorer.from_pretrained(tiny_clip, preprocessing="torch")
