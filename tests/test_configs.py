"""Every shipped yaml parses and instantiates (full-size weights swapped for tiny twins); a tiny fit runs."""

from pathlib import Path

import pytest
import torch
import yaml

from insightedit.cli import main
from insightedit.lightning_cli import InsightEditCLI
from insightedit.systems.insightedit import InsightEditSystem

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))


def as_tiny(config: dict, root: Path) -> dict:
    """The same config with tiny twins, local synthetic data and a CPU trainer."""
    model = config["model"]["init_args"]
    model["preset"] = "tiny"
    model["init_from"] = None
    for section in ("comprehension", "generation"):
        for key in ("pretrained", "dtype"):
            (model.get(section) or {}).pop(key, None)
    (model.get("bridging") or {}).pop("clip_pretrained", None)
    data = config["data"]["init_args"]
    data.update(root=str(root / "data"), synthetic={"num_images": 12, "size": 32, "seed": 0},
                resolution=32, mllm_size=32, clip_size=32, num_workers=0, batch_size=2)
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", devices=1, num_nodes=1, strategy="auto", precision="32-true",
                   default_root_dir=str(root / "run"), logger=False, callbacks=None)
    return config


def test_every_config_is_tested():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL}
    assert {"stage1.yaml", "stage2.yaml", "stage3.yaml", "tiny/stage1.yaml", "tiny/stage2.yaml",
            "tiny/stage3.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_parses_and_instantiates(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    # the file itself parses with the real parser (omegaconf mode), weights and all
    assert main(["fit", "--config", str(path), "--print_config"]) == 0
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(as_tiny(raw, tmp_path)))
    cli = InsightEditCLI(
        model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
        args=["--config", str(tiny)], run=False, parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=None,
    )
    assert isinstance(cli.model, InsightEditSystem)
    assert cli.model.stage.as_dict()["name"] == {1: "align", 2: "edit", 3: "full"}[raw["model"]["init_args"]["stage"]]
    assert cli.datamodule.hparams["resolution"] == 32


def test_tiny_stage_fit_runs_in_process_and_writes_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([
        "fit", "--config", str(CONFIGS / "tiny" / "stage3.yaml"),
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        "--data.init_args.synthetic={num_images: 16, size: 32, seed: 0}",
        "--data.init_args.batch_size=4", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
    ])
    assert code == 0
    last = tmp_path / "checkpoints" / "tiny" / "stage3" / "last.ckpt"
    assert last.is_file()
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert not any("vision_tower" in k for k in checkpoint["state_dict"])
    metrics = (tmp_path / "checkpoints" / "tiny" / "stage3" / "logs").rglob("metrics.csv")
    text = next(metrics).read_text()
    for key in ("train/loss_llm", "train/loss_iaa", "train/loss_align", "train/loss_diff", "val/loss"):
        assert key in text


def test_a_config_that_cannot_be_built_is_one_line(tmp_path, capsys):
    code = main(["fit", "--config", str(CONFIGS / "tiny" / "stage3.yaml"),
                 f"--model.init_args.init_from={tmp_path / 'missing.ckpt'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot build what the config describes: init_from: checkpoint")
