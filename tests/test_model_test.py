"""``insightedit test``: the model's edits and the identity edit scored in one run, JSON + CSV written."""

import csv
import json
from pathlib import Path

import pytest
import torch

from insightedit.cli import main
from insightedit.evaluation.metrics import PSNR_CAP_DB
from insightedit.evaluation.model_test import to_pil

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def test_to_pil_maps_the_range_exactly():
    image = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 2, 2)
    pixels = list(to_pil(image).getdata())
    assert pixels[0] == (0, 128, 255)


@pytest.mark.parametrize("lpips", ["none", "stlpips"])
def test_insightedit_test_scores_model_and_identity(tmp_path, monkeypatch, capsys, lpips):
    if lpips == "stlpips":
        pytest.importorskip("stlpips_pytorch")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report"
    # one run without a logger, one with a CSV logger: the means are logged though Lightning's table is off
    csv_logger = f"{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path / 'csv'}}}}}"
    logger = "false" if lpips == "none" else csv_logger
    code = main([
        "test", "--config", str(CONFIGS / "tiny" / "stage3.yaml"),
        "--data.init_args.synthetic={num_images: 40, size: 32, seed: 0}", "--data.init_args.val_fraction=0.2",
        "--data.init_args.batch_size=4", "--trainer.limit_test_batches=2", f"--trainer.logger={logger}",
        "--trainer.enable_progress_bar=false",
        f"--model.init_args.evaluation={{num_inference_steps: 2, lpips: {lpips}, resolution: 64, out_dir: {out}}}",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "protocol advancededit | 64x64" in printed and "identity edit" in printed
    lines = printed.splitlines()
    # the columns say what they compare; the identity edit's PSNR outside the mask is ∞, not 100.000
    assert "| vs source, outside mask" in printed and "| vs target" in printed and "in-mask PSNR ↑" in printed
    (identity_line,) = [line for line in lines if line.startswith("identity edit") and " all " in line]
    assert identity_line.split(" | ")[1].split()[:2] == ["∞", "1.000"]
    assert ("LPIPS ↓" in printed) == (lpips == "stlpips")  # a metric not computed gets no column
    assert "100.00" not in printed
    assert "in-mask PSNR to the target: this checkpoint" in printed
    assert "not worse than doing nothing" in " ".join(line.strip() for line in lines)  # the note, wrapped
    assert "Test metric" not in printed  # Lightning's own table (verbose=False for test)
    report = json.loads((out / "test_report.json").read_text())
    assert f"edits:  8 PNGs of this checkpoint in {out / 'edits'}" in printed
    assert f"report: {out / 'test_report.json'} and {out / 'test_report.csv'}" in lines
    if lpips == "none":
        assert "logger: none (trainer.logger=false): the means are in the report only" in lines
    else:
        (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
        assert f"CSVLogger: {metrics.parent}" in lines
        with metrics.open() as stream:
            logged = {key: float(value) for row in csv.DictReader(stream) for key, value in row.items() if value}
        for name, system in (("model", "this checkpoint"), ("identity", "identity edit")):
            for key in ("psnr_in_mask", "psnr", "psnr_target"):
                expected = report["systems"][system]["all"][key]
                assert logged[f"test/{name}/{key}"] == pytest.approx(expected, rel=1e-6)
    assert set(report["systems"]) == {"this checkpoint", "identity edit"}
    model, identity = report["systems"]["this checkpoint"]["all"], report["systems"]["identity edit"]["all"]
    assert model["n"] == identity["n"] == 8
    # the identity edit equals the source: perfect preservation, capped PSNR, and a finite PSNR to target
    assert identity["psnr"] == PSNR_CAP_DB and identity["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert identity["psnr_target"] < PSNR_CAP_DB
    # in-mask PSNR to the target: finite for both (the synthetic edits change every masked object)
    assert identity["psnr_in_mask"] < PSNR_CAP_DB and model["psnr_in_mask_n"] == 8
    assert report["psnr_cap_db"] == PSNR_CAP_DB
    # an untrained model does change the image
    assert model["psnr"] < PSNR_CAP_DB
    if lpips == "stlpips":
        assert identity["lpips"] == pytest.approx(0.0, abs=1e-6) and model["lpips"] > 0
    else:
        assert report["lpips"] == "not computed"
    edits = sorted(p.relative_to(out / "edits").as_posix() for p in (out / "edits").rglob("*.png"))
    assert len(edits) == 8 and edits[0].endswith(".png")
    csv_lines = (out / "test_report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("# protocol_name=advancededit") and len(csv_lines) == 2 + 16
    if lpips == "none":
        # the saved edits are what `insightedit evaluate` reads: same protocol, same numbers for those 8
        data_root = next((tmp_path / "data").iterdir())
        code = main(["evaluate", "--data", str(data_root), "--pred-dir", str(out / "edits"), "--protocol",
                     "advancededit", "--resolution", "64", "--lpips", "none", "--no-clip",
                     "--out", str(tmp_path / "evaluate.json")])
        assert code == 0
        evaluated = json.loads((tmp_path / "evaluate.json").read_text())
        scored = {row["id"]: row for row in evaluated["rows"]}
        ours = [row for row in report["rows"] if row["system"] == "this checkpoint"]
        for row in ours:
            assert scored[row["id"]]["psnr"] == pytest.approx(row["psnr"], abs=1e-9)
            assert scored[row["id"]]["ssim_target"] == pytest.approx(row["ssim_target"], abs=1e-9)
            assert scored[row["id"]]["psnr_in_mask"] == pytest.approx(row["psnr_in_mask"], abs=1e-9)
