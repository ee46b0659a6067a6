"""One folder per run (insightedit/training/run_folder.py) and the lines saying what a run loaded."""

from __future__ import annotations

import logging

import pytest
import torch

from insightedit.errors import UserError
from insightedit.models.generation.presets import build_generation_components, load_generation_weights
from insightedit.models.loads import LOADS_LOGGER
from insightedit.systems.editor_system import EditorSystem
from insightedit.training.run_folder import check_fresh_run_folders, previous_run_files, resumes_this_run


def trainer_section(run: str, checkpoints: str | None = None) -> dict:
    """A parsed ``trainer`` section: run folder, one ModelCheckpoint, a W&B logger in the run folder."""
    return {
        "default_root_dir": run,
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"dirpath": checkpoints or run}}],
        "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": run}},
    }


def test_a_fresh_folder_and_a_folder_with_only_logs_are_fresh(tmp_path):
    assert check_fresh_run_folders(trainer_section(str(tmp_path / "absent")), None, False) == []
    (tmp_path / "run" / "wandb" / "offline-run-1").mkdir(parents=True)
    (tmp_path / "run" / "config-test.yaml").write_text("a test of this folder's model")
    assert check_fresh_run_folders(trainer_section(str(tmp_path / "run")), None, False) == []


def test_a_folder_holding_a_run_is_refused_in_one_line_naming_the_ways_out(tmp_path):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "ckpt"
    ckpts.mkdir(parents=True)
    for name in ("000100.ckpt", "000200.ckpt", "000300.ckpt", "last.ckpt"):
        (ckpts / name).write_bytes(b"weights")
    (ckpts / "sharded.ckpt").mkdir()  # a distributed checkpoint is a folder
    section = trainer_section(str(run), str(ckpts))
    assert [p.name for p in previous_run_files(section)] == [
        "000100.ckpt", "000200.ckpt", "000300.ckpt", "last.ckpt", "sharded.ckpt"
    ]
    with pytest.raises(UserError) as refused:
        check_fresh_run_folders(section, None, False)
    assert str(refused.value) == (
        f"{ckpts} already holds a run (000100.ckpt, 000200.ckpt, 000300.ckpt and 2 more): resume it with "
        "--ckpt_path last, start over with --overwrite (deletes its checkpoints and config.yaml), or train in "
        "another folder with --trainer.default_root_dir=DIR"
    )
    other = tmp_path / "elsewhere" / "last.ckpt"  # fine-tuning from another run's checkpoint is a new run here
    with pytest.raises(UserError, match="already holds a run"):
        check_fresh_run_folders(section, str(other), False)
    assert len(list(ckpts.iterdir())) == 5  # nothing was touched


def test_resuming_this_run_is_let_through(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_bytes(b"weights")
    (run / "config.yaml").write_text("config")
    section = trainer_section(str(run))
    for ckpt_path in ("last", "best", str(run / "last.ckpt"), str(run / "sub" / ".." / "last.ckpt")):
        assert resumes_this_run(section, ckpt_path)
        assert check_fresh_run_folders(section, ckpt_path, False) == []
    assert not resumes_this_run(section, None)
    assert not resumes_this_run(section, str(tmp_path / "run2" / "last.ckpt"))  # a sibling, not inside


def test_overwrite_deletes_the_previous_runs_checkpoints_and_config_only(tmp_path):
    run = tmp_path / "run"
    (run / "wandb" / "offline-run-1").mkdir(parents=True)
    (run / "sharded.ckpt").mkdir()
    (run / "sharded.ckpt" / "shard0.distcp").write_bytes(b"weights")
    (run / "last.ckpt").write_bytes(b"weights")
    (run / "config.yaml").write_text("config")
    (run / "edits").mkdir()
    removed = check_fresh_run_folders(trainer_section(str(run)), None, True)
    assert sorted(p.name for p in removed) == ["config.yaml", "last.ckpt", "sharded.ckpt"]
    assert sorted(p.name for p in run.iterdir()) == ["edits", "wandb"]


# ------------------------------------------------------------------------- what a run loaded
def test_generation_pretrained_reports_how_many_unet_tensors_it_loaded(tmp_path, caplog):
    unet = build_generation_components("tiny", image_embed_dim=0, with_text_encoder=False).unet.unet
    state = {f"editor.generation.unet.unet.{k}": v for k, v in unet.state_dict().items()}
    path = tmp_path / "stand_in.ckpt"
    torch.save({"state_dict": state}, path)
    caplog.set_level(logging.INFO, logger=LOADS_LOGGER)
    components = build_generation_components("tiny", pretrained=str(path), with_text_encoder=False)
    assert caplog.messages == []  # construction reads no weights; the load step does
    load_generation_weights(components, str(path))
    assert caplog.messages == [f"generation.pretrained: loaded {len(state)} tensors from {path} (the UNet)"]


def test_init_from_and_pretrained_are_said_once_on_the_console(tmp_path, monkeypatch, caplog):
    lightning_log = logging.getLogger("lightning.pytorch")  # rank_zero_info's logger, whatever ran before
    monkeypatch.setattr(lightning_log, "propagate", True)
    monkeypatch.setattr(lightning_log, "level", logging.INFO)
    caplog.set_level(logging.INFO)
    first = EditorSystem(member="instruct_pix2pix", preset="tiny", stage=1)
    saved = {k: v for k, v in first.state_dict().items() if k in first.saved_names()}
    path = tmp_path / "previous.ckpt"
    torch.save({"state_dict": saved}, path)
    caplog.clear()
    EditorSystem(member="instruct_pix2pix", preset="tiny", stage=1, init_from=str(path),
                 generation={"pretrained": str(path)})
    unet = sum(k.startswith("editor.generation.unet.unet.") and ".processor." not in k for k in saved)
    assert [m for m in caplog.messages if "loaded" in m] == [
        f"generation.pretrained: loaded {unet} tensors from {path} (the UNet)",
        f"init_from: loaded {len(saved)} tensors from {path}",
    ]
    assert [r.name for r in caplog.records if "loaded" in r.message] == [
        "lightning.pytorch.utilities.rank_zero"
    ] * 2  # through Lightning's rank-zero console, not twice through the loads logger
