"""Outputs that cannot be written are refused before any work, every write is atomic, damaged model folders
and ``--trainer.logger=false`` are one line.

Tests run as root, for whom ``chmod 555`` changes nothing: a read-only folder is simulated by ``os.access``
answering no, a full or read-only disk by a write that raises ``OSError(ENOSPC / EROFS)`` after some bytes,
and "not a folder" by a path under a regular file (which fails for root too).
"""

import errno
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import insightedit.commands.export as export_command
from insightedit.atomic_write import OutputNotWritten, atomic_folder, atomic_write, atomic_write_text
from insightedit.cli import main
from insightedit.commands.edit import save_image
from insightedit.evaluation.report import write_json
from insightedit.lightning_cli import InsightEditCLI
from insightedit.pipeline import EditPipeline
from insightedit.systems.editor_system import EditorSystem
from insightedit.training import checkpoint_io
from insightedit.training.checkpoint_io import AtomicCheckpointIO

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
WEIGHT_FILES = [
    "bridging/model.safetensors",
    "comprehension/adapter/adapter_model.safetensors",
    "comprehension/adapter/mm_embeddings.safetensors",
    "comprehension/base/model.safetensors",
    "generation/ip_adapter.safetensors",
    "generation/text_encoder/model.safetensors",
    "generation/unet/diffusion_pytorch_model.safetensors",
]


def disk_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def error_line(capsys) -> str:
    """The single ``error:`` line of a failed command (and no traceback anywhere)."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err
    return lines[0]


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def only_writable_when(monkeypatch, refused: Path) -> None:
    """``os.access`` answers "not writable" for ``refused`` (a read-only folder, as a non-root user sees it)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == refused and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


# ------------------------------------------------------------------------------------------ the helper
def test_atomic_write_replaces_keeps_the_mode_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    fresh = tmp_path / "sub" / "fresh.txt"  # a missing folder is created
    atomic_write_text(fresh, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.read_text() == "x" and (fresh.stat().st_mode & 0o777) == 0o666 & ~umask


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_atomic_write_leaves_the_old_file_and_nothing_else(tmp_path, code):
    target = tmp_path / "out.png"
    target.write_bytes(b"the old image")
    with pytest.raises(OSError) as raised, atomic_write(target) as stream:
        stream.write(b"half of the new")
        raise disk_error(code)
    assert raised.value.errno == code
    assert target.read_bytes() == b"the old image"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_atomic_folder_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(OSError), atomic_folder(target) as staging:
        (staging / "b.txt").write_text("half")
        raise disk_error(errno.ENOSPC)
    assert files_in(target) == {"a.txt": b"old"} and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("new")
    assert files_in(target) == {"b.txt": b"new"} and [p.name for p in tmp_path.iterdir()] == ["model"]


# ---------------------------------------------------------------------------------------------- edit
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """An exported tiny model folder (untrained: only its files matter here)."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    torch.manual_seed(0)
    system = EditorSystem(member="insightedit", preset="tiny", stage=3)
    EditPipeline.from_system(system, resolution=32).save_pretrained(folder)
    return folder


@pytest.fixture
def source_png(tmp_path) -> Path:
    path = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    return path


def edit(model: Path, image: Path, out: Path) -> int:
    return main(
        [
            "edit",
            "--model",
            str(model),
            "--image",
            str(image),
            "--instruction",
            "remove the red circle",
            "--out",
            str(out),
            "--steps",
            "1",
        ]
    )


def test_edit_refuses_an_output_under_a_file_before_reading_anything(tmp_path, capsys):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("a file, not a folder")
    # neither the model folder nor the image exists: the output is checked first
    assert edit(tmp_path / "no-model", tmp_path / "no-image.png", blocker / "out.png") == 2
    assert error_line(capsys) == (
        f"error: cannot write the edited image {blocker / 'out.png'}: {blocker} is a file, not a folder"
    )


def test_edit_refuses_a_read_only_folder_and_a_folder_as_output(tmp_path, monkeypatch, capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    only_writable_when(monkeypatch, read_only)
    assert edit(tmp_path / "no-model", tmp_path / "no-image.png", read_only / "sub" / "out.png") == 2
    assert error_line(capsys) == (
        f"error: cannot write the edited image {read_only / 'sub' / 'out.png'}: folder {read_only} is not writable"
    )
    assert edit(tmp_path / "no-model", tmp_path / "no-image.png", tmp_path) == 2  # a folder named like an image
    folder = tmp_path / "pictures.png"
    folder.mkdir()
    assert error_line(capsys) == f"error: cannot write an image named {tmp_path} (use .png, .jpg, .webp...)"
    assert edit(tmp_path / "no-model", tmp_path / "no-image.png", folder) == 2
    assert error_line(capsys) == f"error: cannot write the edited image {folder}: it is a folder; give a file name"


def test_a_full_disk_while_saving_the_edit_keeps_the_existing_file(
    model_folder, source_png, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out.png"
    assert edit(model_folder, source_png, out) == 0  # the real write works
    written = out.read_bytes()
    assert Image.open(out).size == (30, 20)

    def full_disk(image, stream, *args, **kwargs):
        stream.write(b"\x89PNG half an image")
        raise disk_error(errno.ENOSPC)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    capsys.readouterr()
    assert edit(model_folder, source_png, out) == 2
    assert error_line(capsys) == (
        f"error: cannot write the edited image {out}: No space left on device (ENOSPC); "
        "the existing out.png is unchanged"
    )
    assert out.read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "source.png"]  # no temporary left


def test_a_read_only_disk_while_saving_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(disk_error(errno.EROFS)))
    fresh = tmp_path / "fresh.png"
    with pytest.raises(OutputNotWritten) as raised:
        save_image(Image.new("RGB", (4, 4)), fresh, "PNG")
    assert (
        str(raised.value) == f"cannot write the edited image {fresh}: Read-only file system (EROFS); no file was left"
    )
    assert list(tmp_path.iterdir()) == []  # no 0-byte file, no temporary


# ------------------------------------------------------------------------------------ the model folder
@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_each_truncated_or_missing_weight_file_is_one_line_naming_it(model_folder, source_png, tmp_path, name, capsys):
    assert sorted(str(p.relative_to(model_folder)) for p in model_folder.rglob("*.safetensors")) == WEIGHT_FILES
    path = model_folder / name
    original = path.read_bytes()
    try:
        path.write_bytes(original[: len(original) // 2])
        assert edit(model_folder, source_png, tmp_path / "o.png") == 2
        assert error_line(capsys) == (
            f"error: {path} is damaged (truncated or corrupt: Error while deserializing header: incomplete metadata, "
            "file not fully covered); export the model again"
        )
        path.write_bytes(original[:5])  # even the header's length is cut
        assert edit(model_folder, source_png, tmp_path / "o.png") == 2
        assert error_line(capsys) == (
            f"error: {path} is damaged (truncated or corrupt: Error while deserializing header: header too small); "
            "export the model again"
        )
        path.unlink()
        assert edit(model_folder, source_png, tmp_path / "o.png") == 2
        assert error_line(capsys) == f"error: {path} is missing: the model folder is incomplete; export it again"
    finally:
        path.write_bytes(original)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "name", ["bridging/config.json", "generation/unet/config.json", "comprehension/adapter/adapter_config.json"]
)
def test_a_corrupt_or_missing_config_is_one_line_naming_it(model_folder, source_png, tmp_path, name, capsys):
    path = model_folder / name
    original = path.read_bytes()
    try:
        path.write_text('{"sizes": ')
        assert edit(model_folder, source_png, tmp_path / "o.png") == 2
        assert error_line(capsys) == (
            f"error: {path} is not valid JSON (Expecting value: line 1 column 11 (char 10)); export the model again"
        )
        path.unlink()  # a missing adapter_config.json would otherwise load the MLLM without its LoRA, silently
        assert edit(model_folder, source_png, tmp_path / "o.png") == 2
        assert error_line(capsys) == f"error: {path} is missing: the model folder is incomplete; export it again"
    finally:
        path.write_bytes(original)


# ---------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def tiny_system():
    torch.manual_seed(1)  # other weights than model_folder's, so a replaced folder is told apart
    return EditorSystem(member="insightedit", preset="tiny", stage=3).eval()


def test_export_refuses_an_unwritable_place_before_reading_the_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_command, "load_system", lambda *a: pytest.fail("the checkpoint was read"))
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("")
    assert main(["export", "--ckpt_path", str(tmp_path / "x.ckpt"), "--out", str(blocker / "model")]) == 2
    assert error_line(capsys) == (
        f"error: cannot write the model folder model in {blocker}: {blocker} is a file, not a folder"
    )


def test_a_failed_export_keeps_the_old_folder_and_leaves_nothing(
    tiny_system, model_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(export_command, "load_system", lambda *a: (tiny_system, 32))
    out = tmp_path / "model"
    shutil.copytree(model_folder, out)
    before = files_in(out)
    real_save = EditPipeline.save_pretrained

    def full_disk(pipeline, directory, base=None):
        (Path(directory) / "comprehension").mkdir(parents=True)
        (Path(directory) / "comprehension" / "partial.safetensors").write_bytes(b"\x00" * 10)
        raise disk_error(errno.ENOSPC)

    monkeypatch.setattr(EditPipeline, "save_pretrained", full_disk)
    args = ["export", "--ckpt_path", "unused.ckpt", "--out", str(out), "--overwrite"]
    assert main(args) == 2
    assert error_line(capsys) == (
        f"error: cannot write the model folder {out}: No space left on device (ENOSPC); the existing {out} is unchanged"
    )
    assert files_in(out) == before and [p.name for p in tmp_path.iterdir()] == ["model"]

    def silently_truncated(pipeline, directory, base=None):  # a full disk that a library did not report
        real_save(pipeline, directory, base)
        weights = Path(directory) / "bridging" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])

    monkeypatch.setattr(EditPipeline, "save_pretrained", silently_truncated)
    assert main(args) == 2
    assert error_line(capsys).startswith(
        f"error: cannot write the model folder {out}: the written folder does not read back ("
    )
    assert files_in(out) == before and [p.name for p in tmp_path.iterdir()] == ["model"]

    monkeypatch.setattr(EditPipeline, "save_pretrained", real_save)
    assert main(args) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert sorted(files_in(out)) == sorted(before)
    assert files_in(out)["bridging/model.safetensors"] != before["bridging/model.safetensors"]  # the new weights


# ------------------------------------------------------------------------------------------ reports
def test_a_report_that_cannot_be_written_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json({"n": 1}, path)
    old = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(disk_error(errno.ENOSPC)))
    with pytest.raises(OutputNotWritten) as raised:
        write_json({"n": 2}, path)
    assert str(raised.value) == f"cannot write the report {path}: No space left on device (ENOSPC)"
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["report.json"]


# ------------------------------------------------------------------------------------------- training
class FullDisk:
    """A file on a disk with ``room`` bytes left: the write that crosses it writes what fits and raises ENOSPC."""

    def __init__(self, stream, room: int = 100) -> None:
        self.stream, self.room, self.written = stream, room, 0

    def write(self, data) -> int:
        data = bytes(memoryview(data).cast("B"))
        if self.written + len(data) > self.room:
            self.stream.write(data[: self.room - self.written])
            self.written = self.room
            raise disk_error(errno.ENOSPC)
        self.written += len(data)
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def fill_disk_when(monkeypatch, is_full) -> None:
    """Checkpoint files for which ``is_full(path)`` land on a full disk (the real ``torch.save`` runs)."""
    real = checkpoint_io.atomic_write

    @contextmanager
    def atomic_write_on_a_full_disk(path, *args, **kwargs):
        with real(path, *args, **kwargs) as stream:
            yield FullDisk(stream) if is_full(Path(path)) else stream

    monkeypatch.setattr(checkpoint_io, "atomic_write", atomic_write_on_a_full_disk)


def test_a_failed_checkpoint_save_names_the_file_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(8)}, tmp_path / "last.ckpt")
    fill_disk_when(monkeypatch, lambda path: True)
    with pytest.raises(OutputNotWritten) as raised:  # torch alone says "unexpected pos ..."
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(8)}, tmp_path / "step=2.ckpt")
    assert str(raised.value) == (
        f"could not write checkpoint {tmp_path / 'step=2.ckpt'}: No space left on device (ENOSPC); "
        "the earlier checkpoints there are intact (last.ckpt)"
    )
    with pytest.raises(OSError, match=r"\(ENOSPC\); the previous last\.ckpt is intact$"):  # an OSError for callers
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(8)}, tmp_path / "last.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["w"], torch.ones(8))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def boring_config(tmp_path: Path, **trainer) -> Path:
    """A seconds-long fit: Lightning's BoringModel, a checkpoint after every step, the atomic checkpoint IO."""
    run = tmp_path / "run"
    config = {
        "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "default_root_dir": str(run),
            "plugins": [{"class_path": "insightedit.training.checkpoint_io.AtomicCheckpointIO"}],
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run / "ckpt"),
                        "filename": "{step:06d}",
                        "save_last": True,
                        "every_n_train_steps": 1,
                        "save_top_k": -1,
                    },
                }
            ],
            **trainer,
        },
    }
    path = tmp_path / "boring.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_with_a_full_disk_at_a_checkpoint_stops_with_one_line(tmp_path, monkeypatch, capsys):
    fill_disk_when(monkeypatch, lambda path: path.name == "step=000002.ckpt")  # full from step 2's checkpoint on
    assert main(["fit", "--config", str(boring_config(tmp_path))]) == 2
    folder = tmp_path / "run" / "ckpt"
    assert error_line(capsys) == (
        f"error: could not write checkpoint {folder / 'step=000002.ckpt'}: No space left on device (ENOSPC); "
        "the earlier checkpoints there are intact (last.ckpt, step=000001.ckpt)"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "last.ckpt", "step=000001.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 1


def test_fit_refuses_run_folders_that_cannot_be_written_before_building_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(InsightEditCLI, "instantiate_classes", lambda self: pytest.fail("the model was built"))
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("")
    tiny3 = str(CONFIGS / "tiny" / "stage3.yaml")
    assert main(["fit", "--config", tiny3, f"--trainer.default_root_dir={blocker / 'run'}"]) == 2
    assert error_line(capsys) == (
        f"error: cannot write the run's files (trainer.default_root_dir) in {blocker / 'run'}: "
        f"{blocker} is a file, not a folder"
    )
    monkeypatch.chdir(tmp_path)  # the overlay's checkpoints go to checkpoints/tiny/stage3 under here
    only_writable_when(monkeypatch, tmp_path)
    root = tmp_path / "writable"
    root.mkdir()
    overlay = root / "checkpoints_elsewhere.yaml"  # a dirpath of its own (not ${trainer.default_root_dir})
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {dirpath: checkpoints/tiny/stage3}\n"
    )
    assert main(["fit", "--config", tiny3, "--config", str(overlay), f"--trainer.default_root_dir={root}"]) == 2
    assert error_line(capsys) == (
        "error: cannot write the run's files (ModelCheckpoint.dirpath) in checkpoints/tiny/stage3: "
        f"folder {tmp_path} is not writable"
    )


def test_tiny_fit_without_a_logger_runs_and_says_what_it_left_out(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    # Lightning stops propagating when it is imported before any root handler exists, and earlier tests
    # may have changed its level: route its info messages to caplog whatever ran before.
    lightning_log = logging.getLogger("lightning.pytorch")
    monkeypatch.setattr(lightning_log, "propagate", True)
    monkeypatch.setattr(lightning_log, "level", logging.INFO)
    code = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "tiny" / "stage3.yaml"),
            "--trainer.logger=false",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.synthetic={num_images: 8, size: 32, seed: 0}",
            "--data.init_args.batch_size=2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "note: no logger (trainer.logger=false): LearningRateMonitor left out" in caplog.messages
    run = tmp_path / "checkpoints" / "tiny" / "stage3"
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 1
    assert (run / "edits" / "step_000001.png").is_file()  # EditImageLogger writes its grid to files instead
