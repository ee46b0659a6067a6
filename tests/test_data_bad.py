"""Bad data: each defect planted in a small synthetic dataset is fixed or skipped, counted, never fatal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insightedit.commands.data import main as data_main
from insightedit.data.checking import check_dataset, enforce_bad_fraction
from insightedit.data.datamodule import AdvancedEditDataModule
from insightedit.data.dataset import EditDataset
from insightedit.data.records import load_records
from insightedit.data.samples import SampleConfig
from insightedit.data.synthetic import SynthConfig, synthesize
from insightedit.errors import UserError

SMALL = SampleConfig(resolution=32, clip_size=16, mllm_size=16)


def _ids_using(records, path: Path) -> set[str]:
    return {r.id for r in records if path in (r.source_path, r.target_path)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 12-image dataset with one defect per image (000002..000011); returns (root, expectations)."""
    root = tmp_path_factory.mktemp("bad") / "data"
    synthesize(root, SynthConfig(num_images=12, size=32, seed=7))
    clean = load_records(root)
    src = root / "0_source_img"
    originals = {i: np.asarray(Image.open(src / f"{i:06d}.png")) for i in range(12)}
    expect: dict[str, set[str]] = {}

    (src / "000002.png").unlink()
    expect["missing image"] = _ids_using(clean, src / "000002.png")
    data = (src / "000003.png").read_bytes()
    (src / "000003.png").write_bytes(data[: len(data) // 2])
    expect["truncated"] = _ids_using(clean, src / "000003.png")
    (src / "000004.png").write_bytes(b"this is not an image at all")
    expect["not an image"] = _ids_using(clean, src / "000004.png")
    # exact fixes: CMYK (TIFF), palette, 16-bit grey, alpha, EXIF orientation
    (src / "000005.png").unlink()
    Image.fromarray(originals[5]).convert("CMYK").save(src / "000005.tif")
    (src / "000006.png").unlink()
    Image.fromarray(originals[6]).convert("RGBA").save(src / "000006.png")
    gray = np.asarray(Image.fromarray(originals[7]).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(src / "000007.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90° clockwise
    Image.fromarray(originals[8]).transpose(Image.Transpose.ROTATE_90).save(src / "000008.png", exif=exif)
    palette = Image.fromarray(originals[9]).quantize(colors=256)
    palette.save(src / "000009.png")
    # size mismatch: a target of another aspect ratio
    target = next(r for r in clean if r.source_id == "000010" and r.task_type == "remove").target_path
    Image.new("RGB", (32, 20), (1, 2, 3)).save(target)
    expect["size mismatch"] = _ids_using(clean, target)
    # JSON defects in image 000011: invalid RLE, empty instruction; and a malformed JSON file (000001)
    path = root / "4_instruction_recaption" / "replace" / "000011.json"
    records = json.loads(path.read_text())
    records["0"]["segmentation"]["counts"] = records["0"]["segmentation"]["counts"][:3]
    records["1"]["instruction"] = ["  "]
    del records["1"]["reasoning_instruction1"], records["1"]["reasoning_instruction2"]
    path.write_text(json.dumps(records))
    expect["invalid RLE"] = {"000011/replace/0"}
    expect["empty instruction"] = {"000011/replace/1"}
    broken = root / "4_instruction_recaption" / "remove_add" / "000001.json"
    broken.write_text(broken.read_text()[:-40])
    expect["malformed"] = {str(broken)}
    return root, expect, originals, gray


def test_check_skips_and_counts_each_defect(planted):
    root, expect, _, _ = planted
    report = check_dataset(root)
    found: dict[str, set[str]] = {}
    for bad in report.bad:
        from insightedit.data.checking import reason_kind

        found.setdefault(reason_kind(bad.reason), set()).add(bad.where)
    assert found == expect
    assert report.fixes == {
        "CMYK to RGB": 1, "alpha composited over white": 1, "16-bit to 8-bit": 1,
        "EXIF orientation applied": 1, "palette to RGB": 1,
    }  # fmt: skip
    assert len(report.good) + len(report.bad) == report.total
    assert not {r.id for r in report.good} & set().union(*expect.values())


def test_exact_fixes_give_the_original_pixels(planted):
    root, _, originals, gray = planted
    records = [r for r in load_records(root) if r.task_type == "remove"]
    dataset = EditDataset(records, SMALL)
    by_source = {r.source_id: i for i, r in enumerate(records)}
    for image_id, expected in (("000005", originals[5]), ("000006", originals[6]), ("000008", originals[8])):
        sample = dataset[by_source[image_id]]
        assert sample["record_id"].startswith(image_id) and sample["load_failures"] == 0
        pixels = np.rint((sample["source"].numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
        assert np.array_equal(pixels, expected), image_id
    sample = dataset[by_source["000007"]]
    pixels = np.rint((sample["source"].numpy()[0] + 1) * 127.5).astype(np.uint8)
    assert np.array_equal(pixels, gray)


def test_dataset_replaces_a_sample_that_fails_in_a_worker(planted):
    root, _, _, _ = planted
    records = list(load_records(root))  # no pre-check: bad files surface at load time
    dataset = EditDataset(records, SMALL)
    truncated = next(i for i, r in enumerate(records) if r.source_id == "000003" and r.task_type == "remove")
    sample = dataset[truncated]
    assert not sample["record_id"].startswith("000003/remove_add/0") and sample["load_failures"] >= 1
    assert "truncated" in dataset.failed[truncated]
    loader = torch_loader(dataset)
    seen = sum(len(batch["record_id"]) for batch in loader)
    assert seen == len(records)


def torch_loader(dataset):
    from torch.utils.data import DataLoader

    from insightedit.data.samples import collate_samples

    return DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate_samples)


def test_max_bad_fraction_stops_with_one_clear_error(planted, tmp_path):
    root, _, _, _ = planted
    report = check_dataset(root, full=False)
    with pytest.raises(UserError) as error:
        enforce_bad_fraction(report, 0.01)
    message = str(error.value)
    assert "max_bad_fraction" in message and "\n" not in message
    assert "missing image x4" in message and "0_source_img/000002" in message and "truncated x12" in message
    enforce_bad_fraction(report, 0.9)
    module = AdvancedEditDataModule(root=str(root), max_bad_fraction=0.01, resolution=32)
    with pytest.raises(UserError):
        module.setup("fit")
    module = AdvancedEditDataModule(root=str(root), max_bad_fraction=0.9, resolution=32, clip_size=16, mllm_size=16)
    module.setup("fit")
    assert module.report is not None and len(module.report.bad) > 0


def test_data_check_exit_codes(planted, tmp_path, capsys):
    root, _, _, _ = planted
    assert data_main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "bad records by reason" in out and "truncated" in out and "per type: remove" in out
    clean = tmp_path / "clean"
    synthesize(clean, SynthConfig(num_images=3, size=32, seed=1))
    manifest = tmp_path / "m" / "manifest.jsonl"
    assert data_main(["check", str(clean), "--manifest", str(manifest)]) == 0
    assert "0 bad" in capsys.readouterr().out
    assert len(load_records(manifest)) == len(load_records(clean))
    assert data_main(["check", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert data_main(["check"]) == 2
    assert data_main(["frobnicate"]) == 2
    assert data_main(["synth", "--out", str(clean)]) == 2  # not empty
