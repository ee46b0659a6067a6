"""The tiny configs log to W&B offline: scalars, learning rate, the resolved config and edited-image grids."""

import random
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


def close_wandb() -> None:
    """Finish the run and stop the W&B service, as the console script's process exit does.

    ``wandb.finish()`` returns once the exit record is acknowledged, but wandb-core writes the ``.wandb``
    log in 32 KiB blocks and writes the last, partial block only when it closes the stream, after
    ``finish`` has returned. A file read right after ``finish`` may lack its tail (seen on loaded cores);
    ``wandb.teardown()`` waits for the service process to exit, so every file is complete.
    """
    wandb.finish()
    wandb.teardown()


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
    args = [
        "fit", "--config", str(CONFIGS / "tiny" / f"stage{stage}.yaml"),
        "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--data.init_args.synthetic={num_images: 16, size: 32, seed: 0}", "--data.init_args.batch_size=2",
    ]  # fmt: skip
    try:
        code = main(args)
    finally:
        close_wandb()  # also when fit raised: no run left open for the next test
    assert code == 0
    runs = list((tmp_path / "checkpoints" / "tiny" / f"stage{stage}" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    keys, config = read_run(next(runs[0].glob("run-*.wandb")))
    scalars = ("train/loss", "train/loss_diff", "train/loss_llm", "val/loss", "lr-AdamW/unet", "trainer/global_step")
    for key in (*scalars, "train/skipped_nonfinite", "train/skipped_samples", "val/edits/captions"):
        assert key in keys, (key, sorted(keys))
    assert config["config"]["trainer"]["max_steps"] == 4  # the whole resolved config, to compare runs by
    assert config["config"]["model"]["init_args"]["stage"] == stage
    images = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(images) >= 2  # 2 pairs (the first validation batch) at step 2 and again at step 4
    assert (tmp_path / "checkpoints" / "tiny" / f"stage{stage}" / "config.yaml").is_file()


def test_reader_sees_every_step_of_a_closed_run_with_records_across_blocks(tmp_path):
    """Rows of random size (one larger than a block) are split over 32 KiB blocks; all of them read back."""
    rng = random.Random(0)
    sizes = [rng.randint(0, 6000) for _ in range(39)] + [70000]  # FIRST, MIDDLE..., LAST fragments
    settings = wandb.Settings(x_disable_stats=True, console="off")
    run = wandb.init(dir=str(tmp_path), project="reader", mode="offline", settings=settings)
    for step, size in enumerate(sizes):
        run.log({"row": step, "pad": "x" * size}, step=step)
    close_wandb()
    path = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert path.stat().st_size > 4 * 32768
    rows = {}
    for data in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            rows[record.history.step.num] = (int(items["row"]), len(yaml.safe_load(items["pad"])))
    assert rows == {step: (step, size) for step, size in enumerate(sizes)}
