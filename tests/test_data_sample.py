"""The official AdvancedEdit sample (skipped where ../shared is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from insightedit.data.checking import check_dataset
from insightedit.data.dataset import EditDataset
from insightedit.data.records import load_records, rle_area
from insightedit.data.samples import SampleConfig

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "advancededit-sample"
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason="official AdvancedEdit sample not present")


@pytest.fixture(scope="module")
def records():
    return load_records(SAMPLE)


def test_record_counts_per_task_type(records):
    assert records.format == "pipeline"
    assert len(records) == 22 and records.bad == []
    assert records.task_counts() == {"remove": 5, "add": 5, "replace": 12}
    assert {r.source_id for r in records} == {"1543"}
    # step 4 reasoning phrasings merged into the replace records, step 5 judge scores kept as extras
    replace4 = next(r for r in records if r.id == "1543/replace/4")
    assert replace4.reasoning_instructions[0].startswith("Identify the nearby string instrument")
    assert replace4.extra["qwen_VIE_SC"]["instruction_follow"] == 5
    assert replace4.instructions == [
        "change the acoustic guitar to electric guitar",
        "replace the acoustic guitar with electric guitar",
    ]


def test_mask_area_equals_rle_area(records):
    for record in records:
        mask = record.mask()
        assert mask.dtype == bool and mask.shape == (3744, 5616)
        assert int(mask.sum()) == rle_area(record.segmentation)
    guitar = next(r for r in records if r.id == "1543/remove_add/2").mask()
    ys, xs = np.nonzero(guitar)
    assert (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()) == (612, 1349, 2371, 1028)


def test_targets_paired_with_the_right_records(records):
    by_id = {r.id: r for r in records}
    removed = "1543_3_acoustic_guitar.png"
    replaced = "1543_3_acoustic_guitar_to_electric_guitar.png"
    assert by_id["1543/remove_add/2"].source_path.name == "1543.jpg"
    assert by_id["1543/remove_add/2"].target_path.name == removed
    assert by_id["1543/remove_add/3"].source_path.name == removed  # add = remove reversed
    assert by_id["1543/remove_add/3"].target_path.name == "1543.jpg"
    assert by_id["1543/replace/4"].target_path.name == replaced
    assert by_id["1543/replace/5"].source_path.name == replaced
    assert by_id["1543/replace/5"].target_path.name == "1543.jpg"
    # the other edits' images are not in the release: resolved to nothing, reported by the check
    assert by_id["1543/remove_add/0"].target_path is None
    report = check_dataset(SAMPLE, full=False)
    assert sorted(r.id for r in report.good) == [
        "1543/remove_add/2", "1543/remove_add/3", "1543/replace/4", "1543/replace/5",
    ]  # fmt: skip
    assert report.bad_reasons() == {"no edited image": 18}


def test_sample_tensors_from_real_pair(records):
    good = [r for r in records if r.id in ("1543/remove_add/2", "1543/replace/4")]
    dataset = EditDataset(good, SampleConfig(resolution=64, clip_size=32, mllm_size=48, reasoning_probability=1.0))
    sample = dataset[1]
    assert sample["record_id"] == "1543/replace/4" and sample["load_failures"] == 0
    assert sample["source"].shape == (3, 64, 64) and sample["clip_target"].shape == (3, 32, 32)
    assert sample["mllm_source"].shape == (3, 48, 48)
    assert sample["instruction"] in good[1].reasoning_instructions
    mask = sample["mask"]
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    # 5616x3744 centre square: x in [936, 4680); the guitar box covers x 612..2983, y 1349..2377
    fraction = float(mask.mean())
    assert 0.05 < fraction < 0.25
    # outside the mask the edited image matches the source closely; inside it differs
    diff = (sample["source"] - sample["target"]).abs().mean(0)
    assert float(diff[mask[0] == 0].mean()) < float(diff[mask[0] == 1].mean())
