"""benchmarks/add_ceiling.py and zoo_sampling.py without training: the add ceiling's editors, its metric, the grid."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark

from insightedit.data.scenes import COLOURS, Scene, SceneObject, where


@pytest.fixture(scope="module")
def ceiling() -> Any:
    return load_benchmark("add_ceiling")


@pytest.fixture(scope="module")
def zoo() -> Any:
    return load_benchmark("zoo")


def test_the_ceiling_scores_as_the_zoo_scores(ceiling: Any, zoo: Any) -> None:
    """The same in-mask PSNR as benchmarks/zoo.py's, on uint8 images instead of [-1, 1] tensors."""
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    edited = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=bool)
    mask[3:9, 5:12] = True

    def as_tensor(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None] / 127.5 - 1

    expected = zoo.psnr_in_mask(as_tensor(edited), as_tensor(target), torch.from_numpy(mask)[None, None].double())
    assert ceiling.psnr_in_mask(edited, target, mask) == pytest.approx(expected[0], abs=1e-9)
    assert ceiling.psnr_in_mask(target, target, mask) == zoo.PSNR_CAP_DB


def test_placements_are_what_the_phrase_allows(ceiling: Any) -> None:
    low, high = ceiling.radius_range(32)
    assert (low, high) == (2, 5)  # random_scene's radii at 32 px
    obj = SceneObject("triangle", "blue", 27, 4, 3)  # in the top right
    found = ceiling.placements(obj, 32, 60, np.random.default_rng(1))
    assert len(found) == 60
    for candidate in found:
        assert (candidate.shape, candidate.colour) == (obj.shape, obj.colour)
        assert where(candidate, 32) == "in the top right"
        assert low <= candidate.radius <= high
        assert candidate.radius <= candidate.x < 32 - candidate.radius  # inside the canvas, as drawn
    assert len({(c.x, c.y, c.radius) for c in found}) > 10  # the phrase leaves the place open


def test_the_expected_edit_is_the_mean_of_the_allowed_placements(ceiling: Any) -> None:
    scene = Scene(32, ("grey",), "none", (SceneObject("square", "red", 16, 16, 4),))
    source = scene.without(0).render()
    edits = ceiling.edits(scene.objects[0], source, 32, 50, np.random.default_rng(2))
    assert edits["identity"] is source
    allowed = ceiling.placements(scene.objects[0], 32, 50, np.random.default_rng(2))
    coverage = np.mean([c.mask(32) for c in allowed], axis=0)
    red, grey = np.array(COLOURS["red"]), source[0, 0].astype(np.float64)
    np.testing.assert_allclose(edits["expected"], coverage[..., None] * red + (1 - coverage[..., None]) * grey)
    assert (edits["expected"][0, 0] == grey).all()  # a corner no centre-cell placement reaches
    painted = np.any(edits["placed"] != source, axis=-1)
    assert (edits["placed"][painted] == COLOURS["red"]).all()
    assert painted.sum() == (2 * 4 + 1) ** 2  # a square of the middle radius (4 at 32 px): 9 x 9 pixels


def test_an_editor_that_knows_the_place_beats_the_identity_edit(ceiling: Any, tmp_path: Path) -> None:
    results = ceiling.main(["--scenes", "6", "--draws", "30", "--out", str(tmp_path)])
    editors = results["editors"]
    assert editors["identity"]["n"] == editors["expected"]["n"] > 0
    assert editors["expected"]["psnr_in_mask"] > editors["identity"]["psnr_in_mask"] + 1
    text = (tmp_path / "add_ceiling.md").read_text()
    assert results["commit"] in text and "| expected |" in text


def test_sampler_settings_parse_and_refuse_malformed_ones() -> None:
    sampling = load_benchmark("zoo_sampling")
    sampler = sampling.Sampler.parse("20:7.5:1.5")
    assert (sampler.steps, sampler.text, sampler.image) == (20, 7.5, 1.5)
    assert sampler.label == "20 steps, 7.5 / 1.5"
    with pytest.raises(argparse.ArgumentTypeError, match="steps:text:image"):
        sampling.Sampler.parse("20:7.5")
    args = sampling.parse_args([])
    assert args.seed == 2 and args.seed not in load_benchmark("zoo").DEFAULT_SEEDS  # never a seed the zoo reports
    assert sampling.Sampler.parse("20:7.5:1.5") in args.grid  # the protocol's own setting is in the sweep


def test_sampling_without_foundations_is_one_line(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo_sampling.py"
    run = subprocess.run(
        [sys.executable, str(script), "--foundations", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: foundation clip:") and "insightedit foundations --out" in last
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
