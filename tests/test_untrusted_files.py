"""A checkpoint that would run code is refused on every path that reads one, in one line, payload not run."""

import pathlib
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from insightedit.cli import main
from insightedit.errors import UserError
from insightedit.training.safe_load import UnsafeCheckpointError, check_distributed_checkpoint, load_checkpoint

TINY3 = pathlib.Path(__file__).resolve().parents[1] / "lightning_configs" / "tiny" / "stage3.yaml"


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: proof that the file's code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


@pytest.fixture
def poisoned(tmp_path, marker):
    """A Lightning-looking checkpoint whose hyperparameters hold the payload."""
    path = tmp_path / "poisoned.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"preset": "tiny", "x": Payload(marker)}}, path)
    return path


@pytest.fixture
def poisoned_folder(tmp_path, marker):
    """A distributed-checkpoint folder whose ``.metadata`` (plain pickle, as torch writes it) holds the payload."""
    folder = tmp_path / "sharded"
    dcp.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint_id=folder)
    with (folder / ".metadata").open("wb") as stream:
        pickle.dump({"index": Payload(marker)}, stream)
    return folder


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0]


def _assert_refused(line: str, path: pathlib.Path, marker: pathlib.Path) -> None:
    assert f"insightedit refuses to unpickle {path}: it asks for the global getattr" in line
    assert not marker.exists()


def test_the_payload_works_when_unpickled_unsafely(poisoned, marker):
    # the test's premise: torch.load(weights_only=False), as the code did before, runs it
    torch.load(poisoned, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_load_checkpoint_refuses_code_and_runs_nothing(tmp_path, marker, legacy):
    path = tmp_path / "p.ckpt"
    torch.save({"x": Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_checkpoint(path, "init_from")
    assert str(caught.value) == (
        f"init_from: insightedit refuses to unpickle {path}: it asks for the global getattr, which could run code "
        "(only tensors and plain data are loaded; nothing was run)"
    )
    assert not marker.exists()


def test_load_checkpoint_junk_and_missing_are_one_line(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(UserError) as caught:
        load_checkpoint(junk)
    assert str(caught.value) == f"{junk} is not a readable checkpoint (Unsupported operand 0)"
    with pytest.raises(UserError, match=r"^x: checkpoint .*none\.ckpt not found$"):
        load_checkpoint(tmp_path / "none.ckpt", "x")


def test_export_refuses_a_poisoned_checkpoint(poisoned, marker, tmp_path, capsys):
    assert main(["export", "--ckpt_path", str(poisoned), "--out", str(tmp_path / "model")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: insightedit refuses to unpickle")
    _assert_refused(line, poisoned, marker)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "command, option",
    [
        ("fit", "--model.init_args.init_from"),
        ("test", "--model.init_args.init_from"),
        ("fit", "--model.init_args.generation.pretrained"),
    ],
)
def test_config_paths_refuse_a_poisoned_checkpoint(command, option, poisoned, marker, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([command, "--config", str(TINY3), f"{option}={poisoned}", "--trainer.logger=false"]) == 2
    line = _one_error_line(capsys)
    what = option.split(".", 2)[-1]
    assert line.startswith(f"error: cannot build what the config describes: {what}: insightedit refuses to unpickle")
    _assert_refused(line, poisoned, marker)


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_lightning_ckpt_path_refuses_a_poisoned_file(command, poisoned, marker, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([command, "--config", str(TINY3), "--ckpt_path", str(poisoned)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: ckpt_path: insightedit refuses to unpickle")
    _assert_refused(line, poisoned, marker)


def test_lightning_ckpt_path_last_is_loaded_weights_only(poisoned, marker, tmp_path, capsys, monkeypatch):
    # "last" is resolved by the trainer (after the model is built), not by the CLI's hyperparameter read
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "checkpoints" / "tiny" / "stage3"  # the config's ModelCheckpoint dirpath, where "last" is
    run.mkdir(parents=True)
    shutil.copy(poisoned, run / "last.ckpt")
    code = main([
        "fit", "--config", str(TINY3), "--trainer.logger=false", "--trainer.max_steps=1",
        f"--data.init_args.root={tmp_path / 'data'}", "--data.init_args.synthetic={num_images: 4, size: 32, seed: 0}",
        "--trainer.enable_progress_bar=false", "--ckpt_path", "last",
    ])  # fmt: skip
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: ckpt_path: insightedit refuses to unpickle")
    _assert_refused(line, run / "last.ckpt", marker)


def test_a_poisoned_distributed_checkpoint_folder_is_refused(poisoned_folder, marker, tmp_path, capsys, monkeypatch):
    with pytest.raises(UnsafeCheckpointError, match="it asks for the global pathlib.Path.touch"):
        check_distributed_checkpoint(poisoned_folder)
    monkeypatch.chdir(tmp_path)
    index = poisoned_folder / ".metadata"
    assert main(["fit", "--config", str(TINY3), f"--model.init_args.init_from={poisoned_folder}"]) == 2
    assert f"init_from: insightedit refuses to unpickle {index}" in _one_error_line(capsys)
    assert main(["fit", "--config", str(TINY3), "--ckpt_path", str(poisoned_folder)]) == 2
    assert f"error: ckpt_path: insightedit refuses to unpickle {index}" in _one_error_line(capsys)
    assert not marker.exists()


def test_a_genuine_distributed_checkpoint_index_passes(tmp_path):
    folder = tmp_path / "sharded"
    state = {"w": torch.randn(3, 4), "h": torch.zeros(2, dtype=torch.bfloat16)}
    dcp.save({"state_dict": state, "optimizer_0": {"state": {"w": {"step": torch.tensor(1.0)}}}}, checkpoint_id=folder)
    torch.save({"global_step": 1, "hyper_parameters": {"stage": 3}}, folder / "meta.pt")
    check_distributed_checkpoint(folder)  # no exception: DCP's own index classes are allowed


def test_ckpt_path_does_not_read_its_previous_stage_again(tmp_path, monkeypatch):
    """A stage's checkpoint names its ``init_from``; testing or resuming it must not need that file.

    The checkpoint holds what the previous stage gave (the system saves what it trains and carries), so
    ``insightedit test --ckpt_path stage3/last.ckpt`` worked only while ``stage2/last.ckpt`` still existed.
    """
    from insightedit.lightning_cli import InsightEditCLI

    checkpoint = tmp_path / "stage3.ckpt"
    gone = tmp_path / "stage2" / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"member": "insightedit", "preset": "tiny", "stage": 3,
                                                       "init_from": str(gone)}}, checkpoint)  # fmt: skip
    built = []
    monkeypatch.setattr(InsightEditCLI, "_run_subcommand", lambda self, subcommand: built.append(self.model))
    assert main(["validate", "--config", str(TINY3), "--ckpt_path", str(checkpoint)]) == 0
    assert built and built[0]._init_from is None and built[0].hparams["stage"] == 3
