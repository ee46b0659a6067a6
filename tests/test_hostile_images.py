"""The hostile-file battery through every command that reads images: the same pixels or the same one-line error.

Good files (CMYK, palette, LA, RGBA, 16-bit grey and colour, float TIFFs in [0, 1] and [0, 255], EXIF-rotated
PNG and JPEG, 1 px, 20000x2, lossless WebP, animated GIF, a 4-Mpx bomb under the limit) must decode to the
array ``tests/_hostile_files.py`` computes independently, through ``data check``, the training dataset,
``edit``, the demo's handler, ``evaluate`` and ``data build``. Bad files (truncated, 0 bytes, text, EPS,
bombs of 100 / 108 / 400 Mpx) must give the reader's exact one-line reason everywhere, never a traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _hostile_files import Hostile, bad, good, write_battery
from PIL import Image

from insightedit.cli import main
from insightedit.data.records import EditRecord, encode_mask, write_manifest
from insightedit.errors import UserError
from insightedit.image_reader import UnreadableImage, load_image, load_rgb, probe_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def battery(tmp_path_factory) -> tuple[Path, dict[str, Hostile]]:
    folder = tmp_path_factory.mktemp("battery")
    return folder, write_battery(folder)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 2, width // 2] = True
    return mask


def _record(record_id: str, source: Path, target: Path, size: tuple[int, int]) -> EditRecord:
    mask = _mask(*size)
    return EditRecord(
        id=record_id, source_id=record_id, source_path=source, target_path=target, instructions=["remove it"],
        reasoning_instructions=[], task_type="remove", target_caption="a scene", bbox=[0, 0, 1, 1],
        segmentation=encode_mask(mask),
    )  # fmt: skip


@pytest.fixture(scope="module")
def dataset(battery, tmp_path_factory) -> tuple[Path, dict[str, tuple[str, Hostile]]]:
    """A manifest: per good file a record with it as source and one with its expected pixels (as PNG) as
    source (``ref-``), same target; per bad file a record with it as source. Returns the manifest and, per
    record id, (kind, file)."""
    folder, files = battery
    root = tmp_path_factory.mktemp("dataset")
    records, meaning = [], {}
    for name, hostile in good(files).items():
        stem = Path(name).stem
        reference = root / f"{stem}.expected.png"
        Image.fromarray(hostile.expected).save(reference, compress_level=1)
        size = hostile.expected.shape[:2]
        records.append(_record(f"good-{stem}", folder / name, reference, size))
        records.append(_record(f"ref-{stem}", reference, reference, size))
        meaning[f"good-{stem}"], meaning[f"ref-{stem}"] = ("good", hostile), ("ref", hostile)
    plain = root / "rgb.expected.png"
    for name, hostile in bad(files).items():
        records.append(_record(f"bad-{Path(name).stem}", folder / name, plain, (4, 6)))
        meaning[f"bad-{Path(name).stem}"] = ("bad", hostile)
    return write_manifest(records, root / "manifest.jsonl"), meaning


# -- the reader itself ---------------------------------------------------------------------------------


def test_reader_gives_the_expected_pixels_fixes_and_reasons(battery):
    folder, files = battery
    for name, hostile in good(files).items():
        loaded = load_rgb(folder / name)
        assert np.array_equal(_pixels(loaded.image), hostile.expected), name
        fixes = [hostile.fix] if hostile.fix else []
        assert loaded.fixes == fixes + (["palette to RGB"] if name == "animated.gif" else []), (name, loaded.fixes)
        from_bytes = load_rgb((folder / name).read_bytes(), name=name)  # the streaming / judge entry
        assert np.array_equal(_pixels(from_bytes.image), hostile.expected), name
        assert probe_image(folder / name) == hostile.expected.shape[1::-1], name
        grey = load_image(folder / name, mode="L").image  # masks: the same rules, then luma
        assert np.array_equal(np.asarray(grey), np.asarray(Image.fromarray(hostile.expected).convert("L"))), name
    for name, hostile in bad(files).items():
        with pytest.raises(UnreadableImage) as error:
            load_rgb(folder / name)
        assert str(error.value) == hostile.message(folder / name)
        with pytest.raises(UnreadableImage) as error:
            load_rgb((folder / name).read_bytes(), name="upload")
        assert str(error.value) == hostile.message("upload")
    with pytest.raises(UnreadableImage, match=r"^missing image .*nowhere\.png \(not found\)$"):
        load_rgb(folder / "nowhere.png")


def test_a_chosen_limit_applies_from_the_header(battery):
    folder, files = battery
    path = folder / "bomb_under_limit.png"
    with pytest.raises(UnreadableImage) as error:
        load_rgb(path, max_pixels=3_999_999)
    assert str(error.value) == (
        f"too large to decode safely: {path} is 2000x2000 = 4,000,000 pixels, over the safe limit of 3,999,999 "
        "(decompression bomb?)"
    )
    assert load_rgb(path, max_pixels=4_000_000).image.size == (2000, 2000)


def test_bomb_costs_no_more_memory_than_a_normal_read(battery, tmp_path):
    """Peak RSS of a fresh process: a normal 1000x1000 read, then every bomb (refused from the header)."""
    folder, _ = battery
    normal = tmp_path / "normal.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(normal)
    code = f"""
import resource
from insightedit.image_reader import UnreadableImage, load_rgb
load_rgb({str(normal)!r})
normal = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in ("bomb_100mpx.png", "header_only_bomb.png", "bomb_400mpx.png"):
    try:
        load_rgb({str(folder)!r} + "/" + name)
    except UnreadableImage:
        pass
    else:
        raise SystemExit(name + " was decoded")
print(normal, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    normal_kib, after_kib = map(int, done.stdout.split())
    assert after_kib - normal_kib < 100 * 1024, (normal_kib, after_kib)  # within 100 MiB (measured: +0 MiB)


# -- data check and the training dataset ---------------------------------------------------------------


def test_data_check_skips_each_bad_file_with_its_reason(dataset, battery, capsys):
    from insightedit.data.checking import check_dataset

    manifest, meaning = dataset
    folder, _ = battery
    report = check_dataset(manifest)
    expected_bad = {rid: f.message(folder / f.name) for rid, (kind, f) in meaning.items() if kind == "bad"}
    assert {b.where: b.reason for b in report.bad} == expected_bad
    assert {r.id for r in report.good} == {rid for rid, (kind, _) in meaning.items() if kind != "bad"}
    light = check_dataset(manifest, full=False)  # headers (a PNG's EXIF may follow its pixels: decoded too)
    assert {b.where: b.reason for b in light.bad} == expected_bad
    assert main(["data", "check", str(manifest)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    for rid, reason in expected_bad.items():
        assert f"  {rid}: {reason}\n" in captured.out
    assert "too large x3" in captured.out


def test_training_dataset_reads_the_same_pixels_and_skips_each_bad_record(dataset, battery):
    from insightedit.data.checking import reason_kind
    from insightedit.data.datamodule import AdvancedEditDataModule
    from insightedit.data.dataset import EditDataset
    from insightedit.data.records import load_records
    from insightedit.data.samples import SampleConfig, load_pair

    manifest, meaning = dataset
    folder, _ = battery
    expected_bad = {rid: f.message(folder / f.name) for rid, (kind, f) in meaning.items() if kind == "bad"}
    module = AdvancedEditDataModule(
        root=str(manifest), resolution=8, clip_size=8, mllm_size=8, val_fraction=0.0, max_bad_fraction=0.9
    )
    module.setup("fit")  # the check before training: each bad file is one skipped record
    assert {b.where: b.reason for b in module.report.bad} == expected_bad
    assert {r.id for r in module.datasets["train"].records} == set(meaning) - set(expected_bad)
    # unchecked records (check_images: false, or a file that changed since): each fails at load time alone
    records = list(load_records(manifest))
    train = EditDataset(records, SampleConfig(resolution=8, clip_size=8, mllm_size=8))
    index = {record.id: i for i, record in enumerate(records)}
    for rid, reason in expected_bad.items():
        sample = train[index[rid]]  # replaced by the next usable record, counted
        assert sample["load_failures"] >= 1 and not sample["record_id"].startswith("bad-")
        assert train.failed[index[rid]] == reason
    assert set(train.failed) == {index[rid] for rid in expected_bad}
    kinds = [reason_kind(reason) for reason in expected_bad.values()]
    assert dict(train.failures) == {kind: kinds.count(kind) for kind in kinds}
    for rid, (kind, hostile) in meaning.items():
        if kind != "good":
            continue
        source, _, _ = load_pair(records[index[rid]])
        assert np.array_equal(_pixels(source.image), hostile.expected), rid
        sample, reference = train[index[rid]], train[index["ref-" + rid[5:]]]
        assert sample["record_id"] == rid and sample["load_failures"] == 0
        for key in ("source", "target", "mask", "mllm_source", "clip_target"):
            assert torch.equal(sample[key], reference[key]), (rid, key)


# -- edit and the demo's handler -------------------------------------------------------------------------


class _Identity:
    """A pipeline that returns the image it was given: what ``edit`` writes is what it read."""

    device = "cpu"  # what ``edit``'s status line reports
    member = "identity"
    has_image_branch = False

    def __init__(self) -> None:
        self.seen: list[Image.Image] = []

    def __call__(self, image: Image.Image, instruction: str, **_: object) -> SimpleNamespace:
        self.seen.append(image)
        return SimpleNamespace(images=[image], timings={})


def test_edit_command(battery, tmp_path, capsys, monkeypatch):
    from insightedit.pipeline import EditPipeline

    folder, files = battery
    identity = _Identity()
    monkeypatch.setattr(EditPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: identity))
    for name, hostile in files.items():
        out = tmp_path / f"{Path(name).stem}.out.png"
        argv = ["edit", "--model", str(tmp_path), "--image", str(folder / name), "--instruction", "x", "--out"]
        code = main([*argv, str(out)])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        if hostile.expected is not None:
            assert code == 0, captured.err
            with Image.open(out) as written:
                assert np.array_equal(np.asarray(written), hostile.expected), name
        else:
            assert (code, captured.err) == (2, f"error: {hostile.message(folder / name)}\n")
            assert not out.exists()


def test_demo_handler(battery):
    from insightedit.commands.demo import edit_upload

    folder, files = battery
    identity = _Identity()
    for name, hostile in files.items():
        path = str(folder / name)
        if hostile.expected is not None:
            result = edit_upload(identity, path, "remove it", 1.0, 7.5, 1.5, 2, 0)
            assert np.array_equal(_pixels(result), hostile.expected), name
        else:
            with pytest.raises(UserError) as error:
                edit_upload(identity, path, "remove it", 1.0, 7.5, 1.5, 2, 0)
            assert str(error.value) == hostile.message(path)
    with pytest.raises(UserError, match="^upload an image first$"):
        edit_upload(identity, None, "remove it", 1.0, 7.5, 1.5, 2, 0)


# -- evaluate ----------------------------------------------------------------------------------------------


def test_evaluate_scores_good_files_and_skips_bad_predictions_and_sources(dataset, battery, tmp_path, capsys):
    from insightedit.evaluation.protocols import _load_image

    manifest, meaning = dataset
    folder, files = battery
    predictions = tmp_path / "pred"
    predictions.mkdir()
    records, expected_skips = [], {}
    for rid, (kind, hostile) in meaning.items():
        if kind == "ref":
            continue
        reference = manifest.parent / (
            f"{Path(hostile.name).stem}.expected.png" if kind == "good" else "rgb.expected.png"
        )
        size = hostile.expected.shape[:2] if kind == "good" else (4, 6)
        # prediction = the hostile file, source = its expected pixels: identical pixels score a capped PSNR
        records.append(_record(f"pred-{rid}", reference, None, size))
        shutil.copy(folder / hostile.name, predictions / f"pred-{rid}.png")
        if kind == "bad":  # and the other way round: a hostile source with a plain prediction
            records.append(_record(f"src-{rid}", folder / hostile.name, None, size))
            shutil.copy(reference, predictions / f"src-{rid}.png")
            expected_skips[f"pred-{rid}"] = hostile.message(predictions / f"pred-{rid}.png")
            expected_skips[f"src-{rid}"] = hostile.message(folder / hostile.name)
        else:
            assert np.array_equal(_pixels(_load_image(predictions / f"pred-{rid}.png")), hostile.expected), rid
    data = write_manifest(records, tmp_path / "data" / "manifest.jsonl")
    out = tmp_path / "report.json"
    argv = ["evaluate", "--data", str(data), "--pred-dir", str(predictions), "--protocol", "advancededit"]
    assert main([*argv, "--resolution", "16", "--lpips", "none", "--no-clip", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    report = json.loads(out.read_text())
    assert report["skipped"] == expected_skips
    assert report["counts"]["skipped"] == len(expected_skips) and report["missing"] == []
    scored = {row["id"]: row for row in report["rows"]}
    assert set(scored) == {f"pred-{rid}" for rid, (kind, _) in meaning.items() if kind == "good"}
    assert all(row["psnr_capped"] for row in scored.values()), [
        r for r, row in scored.items() if not row["psnr_capped"]
    ]
    for rid, reason in expected_skips.items():
        assert f"  {rid}: {reason}\n" in captured.out


# -- data build ----------------------------------------------------------------------------------------------


def test_data_build_stores_the_same_pixels_and_records_each_failure(battery, tmp_path, capsys):
    import yaml

    from insightedit.data.advancededit import IMAGE_EXTENSIONS
    from insightedit.data.build.oracle import SCENE_SUFFIX, render_photos

    folder, files = battery
    render_photos(tmp_path / "scene", 1, size=32, seed=0)
    sidecar = next((tmp_path / "scene").glob(f"*{SCENE_SUFFIX}"))
    images = tmp_path / "images"
    images.mkdir()
    paths = {}
    for name in files:
        stem, suffix = Path(name).stem, Path(name).suffix
        # the build lists files by extension (no .gif, .eps there); the reader itself goes by content
        paths[name] = images / (stem + (suffix if suffix in IMAGE_EXTENSIONS else ".png"))
        shutil.copy(folder / name, paths[name])
        shutil.copy(sidecar, images / f"{stem}{SCENE_SUFFIX}")
    config = yaml.safe_load((REPO / "lightning_configs" / "data_build" / "oracle.yaml").read_text())
    (tmp_path / "oracle.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = ["data", "build", "--config", str(tmp_path / "oracle.yaml"), "--images", str(images), "--out", str(out)]
    assert main([*argv, "--steps", "1"]) == 1  # finished, with recorded failures
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    for name, hostile in files.items():
        stem = Path(name).stem
        if hostile.expected is not None:
            with Image.open(out / "0_source_img" / f"{stem}.png") as stored:
                assert np.array_equal(np.asarray(stored), hostile.expected), name
        else:
            failure = json.loads((out / "failures" / "1_caption" / f"{stem}.json").read_text())
            assert failure["reason"] == hostile.message(paths[name]), name
            assert f"1_caption {stem}: {hostile.message(paths[name])}" in captured.out
