"""Checkpoints are written atomically: a crash while saving leaves the previous file whole and loadable."""

import subprocess
import sys

import pytest
import torch

from insightedit.training.checkpoint_io import AtomicCheckpointIO, temporary_path


def test_a_failure_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial temp file was removed


CRASH = """
import os, sys, torch
from insightedit.training.checkpoint_io import AtomicCheckpointIO
real_save = torch.save
def dying_save(obj, handle, *args, **kwargs):
    handle.write(b"PK\\x03\\x04 truncated"); handle.flush()
    os._exit(137)  # the process dies mid-write: no cleanup, no exception handling
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({"global_step": 2}, sys.argv[1])
"""


def test_a_process_killed_mid_save_never_leaves_a_corrupt_last_ckpt(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.arange(4)}, path)
    result = subprocess.run([sys.executable, "-c", CRASH, str(path)], capture_output=True, text=True)
    assert result.returncode == 137, result.stderr
    assert torch.load(path, weights_only=True)["global_step"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and not leftovers[0].endswith(".ckpt")


def test_the_temporary_file_is_hidden_beside_the_target(tmp_path):
    temporary = temporary_path(tmp_path / "last.ckpt")
    assert temporary.parent == tmp_path and temporary.name.startswith(".last.ckpt.") and temporary.suffix == ".tmp"
