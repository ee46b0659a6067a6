"""The tiny configs log to W&B offline: scalars, learning rate, the resolved config and edited-image grids."""

import struct
from pathlib import Path

import pytest
import wandb
import yaml
from wandb.proto import wandb_internal_pb2

from insightedit.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def records(path: Path):
    """The protobuf payloads of a ``run-*.wandb`` file (LevelDB log format: 32 KiB blocks of records).

    wandb >= 0.2x dropped its Python reader (``wandb.sdk.internal.datastore``); the format is small:
    a 7-byte header ``:W&B`` + magic + version, then records ``crc32 | length (u16) | type | data``.
    """
    raw, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert raw[:4] == b":W&B"
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        data, position = raw[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # FULL or LAST: a whole record
            yield pending


def read_run(path: Path) -> tuple[set[str], dict]:
    """The history keys and the config of an offline ``run-*.wandb`` file."""
    keys, config = set(), {}
    for data in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = yaml.safe_load(item.value_json)
    return keys, config


@pytest.mark.parametrize("stage", [3])
def test_tiny_fit_writes_an_offline_wandb_run_with_scalars_lr_config_and_images(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    code = main([
        "fit", "--config", str(CONFIGS / "tiny" / f"stage{stage}.yaml"),
        "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--data.init_args.synthetic={num_images: 16, size: 32, seed: 0}", "--data.init_args.batch_size=2",
    ])
    wandb.finish()  # the console script's process exit does this; in-process we flush the run ourselves
    assert code == 0
    runs = list((tmp_path / "checkpoints" / "tiny" / f"stage{stage}" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    keys, config = read_run(next(runs[0].glob("run-*.wandb")))
    for key in ("train/loss", "train/loss_diff", "train/loss_llm", "val/loss", "lr-AdamW/unet",
                "train/skipped_nonfinite", "trainer/global_step", "val/edits/captions"):
        assert key in keys, (key, sorted(keys))
    assert config["config"]["trainer"]["max_steps"] == 4  # the whole resolved config, to compare runs by
    assert config["config"]["model"]["init_args"]["stage"] == stage
    images = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(images) >= 2  # 2 pairs (the first validation batch) at step 2 and again at step 4
    assert (tmp_path / "checkpoints" / "tiny" / f"stage{stage}" / "config.yaml").is_file()
