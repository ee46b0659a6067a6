"""``insightedit evaluate`` on planted folders: identical predictions, missing and unexpected files, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from test_eval_support import build_tiny_clip, photo, plant_reason_edit

from insightedit.cli import main as cli_main
from insightedit.commands.evaluate import main
from insightedit.errors import UserError
from insightedit.evaluation.metrics import PSNR_CAP_DB


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path, dict[str, list[str]]]:
    ids = plant_reason_edit(tmp_path)
    predictions = tmp_path / "pred"
    for folder, record_ids in ids.items():
        (predictions / folder).mkdir(parents=True)
        for record_id in record_ids:
            shutil.copy(tmp_path / "benchmark" / f"{record_id}.png", predictions / f"{record_id}.png")
    return tmp_path / "benchmark", predictions, ids


def test_identical_predictions_reason_edit(planted, tmp_path: Path, capsys) -> None:
    pytest.importorskip("stlpips_pytorch")
    data, predictions, ids = planted
    (predictions / "1-Left-Right" / "002.png").unlink()  # one missing prediction
    photo("rocket", 32).save(predictions / "stray.png")  # one unexpected file
    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "out" / "report.json"
    code = main(
        [
            "--data",
            str(data),
            "--pred-dir",
            str(predictions),
            "--protocol",
            "reason_edit",
            "--lpips",
            "stlpips",
            "--clip-model",
            str(clip),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["missing"] == ["1-Left-Right/002"] and report["unexpected"] == ["stray.png"]
    assert report["counts"] == {"records": 3, "scored": 2, "missing": 1, "unexpected": 1, "skipped": 0}
    for row in report["rows"]:
        assert row["psnr"] == PSNR_CAP_DB and row["psnr_capped"] is True
        assert abs(row["ssim"] - 1.0) < 1e-6
        assert row["lpips"] == 0.0
        assert row["clip"] >= 0.0
    understanding, reasoning = report["groups"]["understanding"], report["groups"]["reasoning"]
    assert understanding["n"] == 1 and reasoning["n"] == 1 and understanding["psnr_n_capped"] == 1
    assert report["resolution"] == 256 and "ST-LPIPS-alex" in report["lpips"]
    assert report["protocol"]["ssim_implementation"] == "cropped"
    printed = capsys.readouterr().out
    assert "protocol reason_edit | 256x256 | LPIPS: ST-LPIPS-alex" in printed and "missing predictions (1)" in printed
    with out.with_suffix(".csv").open() as stream:
        assert stream.readline().startswith("# protocol_name=reason_edit; resolution=256")
        rows = list(csv.DictReader(stream))
    assert sorted(row["id"] for row in rows) == ["1-Left-Right/001", "6-Reasoning/001"]


def test_lpips_from_local_backbone_and_edited_predictions(planted, tmp_path: Path) -> None:
    data, predictions, _ = planted
    weights = tmp_path / "squeeze.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    edited = predictions / "6-Reasoning" / "001.png"
    array = np.asarray(photo("chelsea")).copy()
    array[:10] = 0  # change the unedited region: preservation metrics must notice
    from PIL import Image

    Image.fromarray(array).save(edited)
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "--data",
                str(data),
                "--pred-dir",
                str(predictions),
                "--protocol",
                "reason_edit",
                "--lpips-weights",
                str(weights),
                "--no-clip",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = {row["id"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["1-Left-Right/001"]["lpips"] == 0.0 and rows["1-Left-Right/001"]["psnr_capped"]
    changed = rows["6-Reasoning/001"]
    assert changed["psnr"] < 40 and changed["ssim"] < 1 and changed["lpips"] > 0 and not changed["psnr_capped"]


def test_user_errors_exit_two_with_one_line(planted, tmp_path: Path, capsys) -> None:
    data, predictions, _ = planted
    code = cli_main(
        [
            "evaluate",
            "--data",
            str(data),
            "--pred-dir",
            str(predictions),
            "--protocol",
            "reason_edit",
            "--lpips-weights",
            str(tmp_path / "missing.pth"),
            "--no-clip",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "squeezenet1_1-b8a52dc0.pth" in error
    assert (
        cli_main(
            [
                "evaluate",
                "--data",
                str(tmp_path / "nope"),
                "--pred-dir",
                str(predictions),
                "--protocol",
                "reason_edit",
                "--lpips",
                "none",
                "--no-clip",
            ]
        )
        == 2
    )
    text = data / "6-Reasoning" / "Reason_test.txt"
    text.write_text("an instruction without the marker\n")
    with pytest.raises(UserError, match=r"Reason_test.txt:1: malformed"):
        main(
            [
                "--data",
                str(data),
                "--pred-dir",
                str(predictions),
                "--protocol",
                "reason_edit",
                "--lpips",
                "none",
                "--no-clip",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )


def test_advancededit_protocol_with_records(tmp_path: Path) -> None:
    pytest.importorskip("stlpips_pytorch")
    from insightedit.data.records import EditRecord, encode_mask, write_manifest

    images = tmp_path / "images"
    images.mkdir()
    records = []
    for index, (name, task) in enumerate([("astronaut", "remove"), ("coffee", "replace"), ("chelsea", "add")]):
        source, target = images / f"{index}_src.png", images / f"{index}_tgt.png"
        photo(name).save(source)
        photo("rocket").save(target)
        mask = np.zeros((96, 96), dtype=bool)
        mask[30:60, 30:60] = True
        records.append(
            EditRecord(
                id=f"r{index}",
                source_id=str(index),
                source_path=source,
                target_path=target if index != 1 else images / "not-released.png",
                instructions=["make it so"],
                reasoning_instructions=[],
                task_type=task,
                target_caption="a red apple",
                bbox=[30, 30, 30, 30],
                segmentation=encode_mask(mask),
            )
        )
    manifest = write_manifest(records, tmp_path / "data" / "manifest.jsonl")
    predictions = tmp_path / "pred"
    predictions.mkdir()
    shutil.copy(images / "0_tgt.png", predictions / "r0.png")  # perfect edit: equals the target
    shutil.copy(images / "1_src.png", predictions / "r1.png")  # identity edit
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "--data",
                str(manifest.parent),
                "--pred-dir",
                str(predictions),
                "--protocol",
                "advancededit",
                "--resolution",
                "64",
                "--lpips",
                "stlpips",
                "--no-clip",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    rows = {row["id"]: row for row in report["rows"]}
    assert report["missing"] == ["r2"]
    assert rows["r0"]["psnr_target_capped"] and rows["r0"]["lpips_target"] == 0.0
    assert abs(rows["r0"]["ssim_target"] - 1) < 1e-6
    assert rows["r1"]["psnr_capped"] and rows["r1"]["lpips"] == 0.0
    assert rows["r1"]["psnr_target"] is None and "target image not found" in report["notes"]["r1"]
    assert set(report["groups"]) == {"all", "subset:remove", "subset:replace"}
    assert report["protocol"]["with_target_metrics"] is True and report["resolution"] == 64
    assert "64x64" in report["protocol"]["preservation"]
