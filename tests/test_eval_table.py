"""The printed tables: columns grouped by what they compare, ∞ for identical images, the in-mask PSNR headline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
from PIL import Image

from insightedit.evaluation.metrics import PSNR_CAP_DB, psnr_in_region, to_unit_tensor
from insightedit.evaluation.model_test import IDENTITY_NOTE, EditTestRun, in_mask_headline
from insightedit.evaluation.model_test import TestSettings as EditTestSettings
from insightedit.evaluation.protocols import EvalSample, get_protocol, pixel_scores, prepare
from insightedit.evaluation.report import (
    SOURCE_SECTION,
    TARGET_SECTION,
    aggregate_rows,
    for_console,
    format_grouped_table,
    format_table,
)


def _box_mask(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[16:40, 8:56] = True
    return mask


def test_psnr_in_region_is_the_mean_error_over_the_mask_only() -> None:
    a = skimage.data.astronaut()[:64, :64]
    b = skimage.data.coffee()[:64, :64]
    mask = _box_mask()
    ours = psnr_in_region(to_unit_tensor(a), to_unit_tensor(b), to_unit_tensor(np.stack([mask] * 3, -1))[:, :1])
    difference = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    reference = -10 * math.log10(float(np.mean(difference[mask] ** 2)))  # numpy: only the mask's pixels
    assert ours is not None and ours.value == pytest.approx(reference, abs=1e-9) and not ours.capped
    # the pixels outside the region do not count at all
    b_outside = b.copy()
    b_outside[~mask] = 0
    again = psnr_in_region(
        to_unit_tensor(a), to_unit_tensor(b_outside), to_unit_tensor(np.stack([mask] * 3, -1))[:, :1]
    )
    assert again is not None and again.value == pytest.approx(reference, abs=1e-9)


def test_psnr_in_region_caps_identical_and_refuses_an_empty_region() -> None:
    image = to_unit_tensor(skimage.data.astronaut()[:32, :32])
    weights = to_unit_tensor(np.stack([_box_mask(32)] * 3, -1))[:, :1]
    same = psnr_in_region(image, image.clone(), weights)
    assert same is not None and same.raw == math.inf and same.value == PSNR_CAP_DB and same.capped
    assert psnr_in_region(image, image, weights * 0) is None


def test_pixel_scores_in_mask_psnr_compares_edited_with_target_inside_the_mask() -> None:
    size = 64
    mask = _box_mask(size)
    source = np.full((size, size, 3), 100, np.uint8)
    target = source.copy()
    target[mask] = 200  # the edit: the masked box turns light
    edited = source.copy()
    edited[mask] = 200 - 51  # inside: off by 51 levels = 0.2 → 10·log10(1 / 0.04) ≈ 13.98 dB
    edited[~mask] = 0  # outside: a ruined background must not change the in-mask score
    sample = EvalSample(
        id="x",
        group="all",
        subset="replace",
        source=Image.fromarray(source),
        edited=Image.fromarray(edited),
        mask=mask,
        instruction="make it light",
        caption="a light box",
        target=Image.fromarray(target),
    )
    scores = pixel_scores(prepare(sample, get_protocol("advancededit", size)), get_protocol("advancededit", size), None)
    assert scores["psnr_in_mask"] == pytest.approx(-10 * math.log10((51 / 255) ** 2), abs=1e-9)
    assert scores["psnr_in_mask_capped"] is False
    identity = EvalSample(**{**sample.__dict__, "edited": Image.fromarray(source)})
    scores = pixel_scores(
        prepare(identity, get_protocol("advancededit", size)), get_protocol("advancededit", size), None
    )
    assert scores["psnr_in_mask"] == pytest.approx(-10 * math.log10((100 / 255) ** 2), abs=1e-9)
    assert scores["psnr"] == PSNR_CAP_DB and scores["psnr_capped"] is True


def _summary(psnr_values: list[float], capped: list[bool], in_mask: list[float]) -> dict[str, object]:
    rows = [
        {
            "psnr": p,
            "psnr_capped": c,
            "ssim": 1.0 if c else 0.5,
            "lpips": None,
            "psnr_target": 20.0,
            "psnr_target_capped": False,
            "ssim_target": 0.7,
            "psnr_in_mask": m,
            "psnr_in_mask_capped": False,
        }
        for p, c, m in zip(psnr_values, capped, in_mask, strict=True)
    ]
    return aggregate_rows(rows)


def test_grouped_table_sections_infinity_and_partly_capped_mark() -> None:
    all_capped = _summary([PSNR_CAP_DB] * 2, [True, True], [7.0, 8.0])
    partly = _summary([PSNR_CAP_DB, 30.0], [True, False], [9.0, 10.0])
    lines = format_grouped_table(
        ["system", "n"], [(["identity", "2"], all_capped), (["model", "2"], partly)], PSNR_CAP_DB
    )
    sections, titles, identity, model, note = lines
    # each section's name sits above its columns, separated by the same " | " as the rows
    assert sections.split(" | ")[1].strip() == SOURCE_SECTION and sections.split(" | ")[2].strip() == TARGET_SECTION
    bars = [i for i, ch in enumerate(sections) if ch == "|"]
    assert bars == [i for i, ch in enumerate(titles) if ch == "|"] == [i for i, ch in enumerate(model) if ch == "|"]
    assert [t.strip() for t in titles.split(" | ")[1].split("  ") if t.strip()] == ["PSNR ↑", "SSIM ↑"]
    assert titles.split(" | ")[2].split()[:3] == ["in-mask", "PSNR", "↑"]
    # every image capped: ∞, never "100.00"; partly capped: the capped mean, marked and explained
    assert identity.split(" | ")[1].split()[:2] == ["∞", "1.000"] and "100.00" not in identity
    assert model.split(" | ")[1].split()[0] == f"{(PSNR_CAP_DB + 30.0) / 2:.2f}*"
    assert identity.split(" | ")[2].split()[:3] == ["7.50", "20.00", "0.700"]
    assert model.split(" | ")[2].split()[0] == "9.50"
    assert note.startswith("* ") and "100 dB" in note
    # a column no group has a value for (LPIPS not computed, CLIPScore, VIEScore) is left out, and so is a
    # section without columns
    assert "LPIPS" not in titles and "CLIP" not in titles and "edited image" not in sections


def test_for_console_falls_back_to_ascii() -> None:
    text = "PSNR ↑ | ∞ | LPIPS ↓"
    assert for_console(text, "utf-8") == text
    assert for_console(text, "ascii") == "PSNR (+) | inf | LPIPS (-)"


def test_evaluate_table_groups_columns() -> None:
    report = {
        "protocol_name": "advancededit",
        "resolution": 64,
        "lpips": "none",
        "clip_model": "not computed",
        "judge": "not computed",
        "psnr_cap_db": PSNR_CAP_DB,
        "groups": {"all": _summary([PSNR_CAP_DB], [True], [6.0])},
        "counts": {"records": 1, "scored": 1, "missing": 0, "unexpected": 0, "skipped": 0},
    }
    lines = format_table(report).splitlines()
    assert SOURCE_SECTION in lines[1] and TARGET_SECTION in lines[1]
    assert lines[3].split(" | ")[1].split()[0] == "∞" and lines[3].split(" | ")[2].split()[0] == "6.00"


def _test_run_report() -> tuple[EditTestRun, dict[str, object]]:
    run = EditTestRun(EditTestSettings(resolution=32, lpips="none"))
    model = {
        "all": _summary([25.0, 27.0], [False, False], [9.0, 11.0]),
        "subset:remove": _summary([25.0], [False], [9.0]),
        "subset:add": _summary([27.0], [False], [11.0]),
    }
    identity = {
        "all": _summary([PSNR_CAP_DB] * 2, [True, True], [7.0, 8.0]),
        "subset:remove": _summary([PSNR_CAP_DB], [True], [7.0]),
        "subset:add": _summary([PSNR_CAP_DB], [True], [8.0]),
    }
    report = {
        "protocol_name": "advancededit",
        "resolution": 32,
        "lpips": "not computed",
        "clip_model": "not computed",
        "judge": "not computed",
        "psnr_cap_db": PSNR_CAP_DB,
        "systems": {"this checkpoint": model, "identity edit": identity},
    }
    return run, report


def test_in_mask_headline_gives_the_gain_over_the_identity_edit() -> None:
    _, report = _test_run_report()
    headline = in_mask_headline(report["systems"])  # type: ignore[arg-type]
    assert headline == (
        "in-mask PSNR to the target: this checkpoint 10.00 dB, identity edit 7.50 dB "
        "(+2.50 dB; per task type remove +2.00, add +3.00)"
    )
    assert in_mask_headline({"this checkpoint": {"all": {"psnr": 1.0}}}) is None


def test_test_table_pools_first_then_task_types_with_the_identity_beside_and_explains_it() -> None:
    run, report = _test_run_report()
    lines = run.table(report).splitlines()
    assert lines[0].startswith("protocol advancededit | 32x32")
    body = [line.split(" | ")[0].split() for line in lines[3:9]]
    assert body == [
        ["this", "checkpoint", "all", "2"],
        ["identity", "edit", "all", "2"],
        ["this", "checkpoint", "remove", "1"],
        ["identity", "edit", "remove", "1"],
        ["this", "checkpoint", "add", "1"],
        ["identity", "edit", "add", "1"],
    ]
    assert lines[4].split(" | ")[1].split()[0] == "∞"
    assert lines[9].startswith("in-mask PSNR to the target: this checkpoint 10.00 dB")
    note = " ".join(line.strip() for line in lines[10:])
    assert note == IDENTITY_NOTE and "not worse than doing nothing" in note
