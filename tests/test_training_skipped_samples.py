"""Records that fail to load during training are logged per step as ``train/skipped_samples`` (cumulative)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from insightedit.data.datamodule import AdvancedEditDataModule
from insightedit.data.records import load_records
from insightedit.data.synthetic import SynthConfig, synthesize
from insightedit.systems.editor_system import EditorSystem
from insightedit.systems.generation import GenerationModule

STEPS = 2
BROKEN = Path("0_source_img") / "000001.png"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Two copies of a 3-image synthetic set; in ``bad`` one source image is not an image."""
    roots = {}
    for name in ("clean", "bad"):
        roots[name] = tmp_path_factory.mktemp(name) / "data"
        synthesize(roots[name], SynthConfig(num_images=3, size=32, seed=3))
    (roots["bad"] / BROKEN).write_bytes(b"this is not an image at all")
    return roots


def expected_skips_per_epoch(root: Path) -> int:
    """Records passed over in one pass over every index: each bad index skips its run of consecutive bad ones."""
    bad = [root / BROKEN in (record.source_path, record.target_path) for record in load_records(root)]
    total = 0
    for start in range(len(bad)):
        run = 0
        while bad[(start + run) % len(bad)]:
            run += 1
        total += run
    return total


def logged(tmp_path: Path) -> list[tuple[int, float]]:
    """``(step, train/skipped_samples)`` rows of the CSV log."""
    rows = csv.DictReader(next(tmp_path.rglob("metrics.csv")).open())
    return [(int(row["step"]), float(row["train/skipped_samples"])) for row in rows if row["train/skipped_samples"]]


def fit(module: L.LightningModule, root: Path, tmp_path: Path) -> list[tuple[int, float]]:
    """Train ``STEPS`` steps, each one batch holding every record (so each step is one pass over all indices)."""
    records = len(load_records(root))
    data = AdvancedEditDataModule(
        root=str(root),
        resolution=32,
        clip_size=32,
        mllm_size=32,
        batch_size=records,
        val_fraction=0.0,
        check_images=False,
        reasoning_probability=0.0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        limit_val_batches=0,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return logged(tmp_path)


def tiny_generation() -> GenerationModule:
    return GenerationModule(preset="tiny", image_embed_dim=0, prediction_type="sample", residual=True)


def test_a_bad_record_is_counted_cumulatively_and_a_clean_set_logs_zero(datasets, tmp_path):
    L.seed_everything(0)
    per_epoch = expected_skips_per_epoch(datasets["bad"])
    assert per_epoch == 36  # the 8 records of image 000001 are consecutive: 8 + 7 + ... + 1
    assert fit(tiny_generation(), datasets["bad"], tmp_path / "bad") == [(0, per_epoch), (1, 2 * per_epoch)]
    assert fit(tiny_generation(), datasets["clean"], tmp_path / "clean") == [(0, 0.0), (1, 0.0)]


def test_an_editor_system_logs_skipped_samples_too(datasets, tmp_path):
    L.seed_everything(0)
    system = EditorSystem(
        member="insightedit", preset="tiny", stage=1, comprehension={"num_mm_tokens": 8, "lora_rank": 4}
    )
    assert fit(system, datasets["bad"], tmp_path) == [(0, 36.0), (1, 72.0)]
