"""Data module, sample contract, workers x distributed ranks, and litdata streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from insightedit.data.datamodule import AdvancedEditDataModule
from insightedit.data.images import CLIP_MEAN, CLIP_STD
from insightedit.data.samples import collate_samples

KW = {"resolution": 32, "clip_size": 24, "mllm_size": 28, "batch_size": 4, "val_fraction": 0.25}


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm") / "synthetic"
    dm = AdvancedEditDataModule(root=str(root), synthetic={"num_images": 16, "size": 32, "seed": 2}, **KW)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_synthetic_generated_on_first_use_and_cached(module):
    assert (module.root / "synthetic.json").is_file()
    stamp = (module.root / "synthetic.json").stat().st_mtime_ns
    again = AdvancedEditDataModule(root=str(module.root), synthetic={"num_images": 16, "size": 32, "seed": 2}, **KW)
    again.prepare_data()
    assert (module.root / "synthetic.json").stat().st_mtime_ns == stamp
    other = AdvancedEditDataModule(root=str(module.root), synthetic={"num_images": 17, "size": 32, "seed": 2}, **KW)
    with pytest.raises(Exception, match="other settings"):
        other.prepare_data()


def test_sample_contract_values(module):
    dataset = module.datasets["train"]
    record = dataset.records[0]
    sample = dataset[0]
    assert sample["record_id"] == record.id and sample["source_id"] == record.source_id
    assert sample["task_type"] == record.task_type and sample["target_caption"] == record.target_caption
    assert sample["instruction"] in record.instructions + record.reasoning_instructions
    assert sample["plain_instruction"] == record.instructions[0]  # whichever phrasing was drawn
    for key, shape in (("source", (3, 32, 32)), ("target", (3, 32, 32)), ("mask", (1, 32, 32))):
        assert sample[key].dtype == torch.float32 and sample[key].shape == shape
    source = np.array(Image.open(record.source_path))
    assert torch.equal(sample["source"], torch.from_numpy(source).permute(2, 0, 1).float() / 127.5 - 1)
    assert torch.equal(sample["mask"][0].bool(), torch.from_numpy(record.mask()))
    assert set(sample["mask"].unique().tolist()) == {0.0, 1.0}
    target = np.asarray(Image.open(record.target_path)).astype(np.float32) / 255
    clip = sample["clip_target"]
    assert clip.shape == (3, 24, 24) and sample["mllm_source"].shape == (3, 28, 28)
    # a flat background corner survives resizing: its value is (pixel - mean) / std
    expected = (target[0, 0] - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.allclose(clip[:, 0, 0].numpy(), expected, atol=0.05)


def test_splits_and_loaders(module):
    train = {r.source_id for r in module.datasets["train"].records}
    val = {r.source_id for r in module.datasets["val"].records}
    assert len(val) == 4 and len(train) == 12 and not train & val
    batch = next(iter(module.val_dataloader()))
    assert batch["source"].shape == (4, 3, 32, 32) and isinstance(batch["instruction"], list)
    assert next(iter(module.test_dataloader()))["record_id"] == batch["record_id"]


def test_two_workers_two_ranks_cover_the_dataset_once(module):
    dataset = module.datasets["train"]
    n = len(dataset) - len(dataset) % 2
    subset = torch.utils.data.Subset(dataset, range(n))
    seen: list[list[str]] = []
    for rank in (0, 1):
        sampler = DistributedSampler(subset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(subset, batch_size=5, sampler=sampler, num_workers=2, collate_fn=collate_samples)
        seen.append([rid for batch in loader for rid in batch["record_id"]])
    assert len(seen[0]) == len(seen[1]) == n // 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(dataset.records[i].id for i in range(n))


def test_streaming_round_trip(module, tmp_path):
    from insightedit.commands.data import main as data_main

    out = tmp_path / "shards"
    assert data_main(["optimize", str(module.root), "--out", str(out), "--val-fraction", "0.25"]) == 0
    streaming = AdvancedEditDataModule(root=str(out), **KW)
    streaming.setup("fit")
    train = streaming.datasets["train"]
    assert len(train) + len(streaming.datasets["val"]) == len(module.datasets["train"]) + len(module.datasets["val"])
    by_id = {r.id: i for i, r in enumerate(module.datasets["train"].records)}
    sample = train[0]
    reference = module.datasets["train"][by_id[sample["record_id"]]]
    for key in ("source", "target", "mask", "clip_target"):
        assert torch.equal(sample[key], reference[key]), key
    loader = streaming.train_dataloader()
    batch = next(iter(loader))
    assert batch["source"].shape == (4, 3, 32, 32)
    assert "current_epoch" in str(loader.state_dict()) or loader.state_dict()
