"""Synthetic AdvancedEdit: exact masks, add = reversed remove, source splits, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insightedit.data.dataset import split_by_source
from insightedit.data.records import load_records
from insightedit.data.scenes import COLOURS, SHAPES, Scene, SceneObject
from insightedit.data.synthetic import SynthConfig, referring_expressions, synthesize


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, SynthConfig(num_images=40, size=32, seed=3))
    return root


@pytest.fixture(scope="module")
def records(synth_root):
    return load_records(synth_root)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def test_schema_and_counts(records):
    assert records.bad == [] and records.format == "pipeline"
    counts = records.task_counts()
    assert counts["remove"] == counts["add"] and counts["replace"] == 2 * counts["remove"]
    assert counts["remove"] >= 40  # at least one object per scene
    assert len({r.source_id for r in records}) == 40
    for record in records:
        assert record.instructions and len(record.reasoning_instructions) == 2
        assert record.target_path is not None and record.target_path.is_file() and record.source_path.is_file()


def test_every_mask_is_exactly_the_changed_pixels(records):
    for record in records:
        source, target = _pixels(record.source_path), _pixels(record.target_path)
        changed = np.any(source != target, axis=-1)
        mask = record.mask()
        assert mask.shape == changed.shape == (32, 32)
        assert np.array_equal(mask, changed), record.id
        assert mask.any()
        x, y, w, h = record.bbox
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()) == (x, y, w, h)


def test_add_is_the_reverse_of_remove(records):
    by_id = {r.id: r for r in records}
    pairs = 0
    for record in records:
        if record.task_type != "remove":
            continue
        image, group, key = record.id.split("/")
        add = by_id[f"{image}/{group}/{int(key) + 1}"]
        assert add.task_type == "add"
        assert add.source_path == record.target_path and add.target_path == record.source_path
        assert np.array_equal(add.mask(), record.mask())
        assert add.class_target == record.class_origin
        assert add.target_caption == record.source_caption
        pairs += 1
    assert pairs == records.task_counts()["remove"]


def test_captions_and_instructions_name_the_edit(records):
    for record in records:
        if record.task_type == "remove":
            name = record.class_origin.replace("_", " ")
            assert record.instructions == [f"remove the {name}"]
            assert name in record.source_caption and record.target_caption.count(name) == 0
        if record.task_type == "replace":
            assert record.instructions[0] == f"change the {record.class_origin} to {record.class_target}"
            assert record.class_target in record.target_caption


def test_reasoning_expressions_single_out_the_object():
    big = SceneObject("circle", "red", 8, 8, 6)
    small_red = SceneObject("square", "red", 24, 24, 2)
    blue = SceneObject("triangle", "blue", 24, 8, 5)
    scene = Scene(32, ("grey",), "none", (big, small_red, blue))
    refs = referring_expressions(scene, 1)
    assert "the object that is the same colour as the largest one" in refs
    assert "the smallest object" in refs and "the lowest object" in refs
    assert "the object with four corners" in refs
    assert "the largest object" in referring_expressions(scene, 0)
    assert "the object that is not red" in referring_expressions(scene, 2)
    assert set(SHAPES) == {"circle", "square", "triangle"} and 4 <= len(COLOURS) <= 6


def test_splits_share_no_source_image(records):
    splits = split_by_source(list(records), val_fraction=0.2, test_fraction=0.1, seed=5)
    sources = {name: {r.source_id for r in split} for name, split in splits.items()}
    assert len(sources["val"]) == 8 and len(sources["test"]) == 4 and len(sources["train"]) == 28
    assert not sources["train"] & sources["val"] and not sources["train"] & sources["test"]
    assert not sources["val"] & sources["test"]
    assert sum(len(s) for s in splits.values()) == len(records)
    again = split_by_source(list(records), val_fraction=0.2, test_fraction=0.1, seed=5)
    assert [r.id for r in again["val"]] == [r.id for r in splits["val"]]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path):
    config = SynthConfig(num_images=12, size=32, seed=11)
    synthesize(tmp_path / "a", config)
    synthesize(tmp_path / "b", config)
    synthesize(tmp_path / "c", SynthConfig(num_images=12, size=32, seed=12))
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and len(a) > 12 * 3
    assert a != c
