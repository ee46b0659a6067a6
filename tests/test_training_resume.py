"""A run killed with SIGKILL and resumed with ``--ckpt_path last`` ends with exactly the uninterrupted weights."""

import signal
import subprocess
import time

import torch
from _training_runs import environment, fit_command, run_fit, small_config

MAX_STEPS, EVERY, EPOCH = 10, 2, 4  # epochs of 4 batches of 2: the resumed part crosses epoch boundaries


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# three real runs, two side by side: ~32 s on 2 idle cores (~4 min when the cores are shared)
def test_sigkilled_run_resumed_from_last_matches_the_uninterrupted_run_bit_for_bit(tmp_path):
    straight = small_config(tmp_path, "straight", max_steps=MAX_STEPS, every=EVERY, epoch_batches=EPOCH)
    resumed = small_config(tmp_path, "resumed", max_steps=MAX_STEPS, every=EVERY, epoch_batches=EPOCH)
    run_dir = tmp_path / "resumed"

    # the uninterrupted run and the run to kill go side by side; the second is killed once it has checkpoints
    log = (tmp_path / "victim.log").open("w")
    victim = subprocess.Popen(fit_command(resumed), cwd=tmp_path, env=environment(), stdout=log, stderr=log)
    straight_run = subprocess.Popen(fit_command(straight), cwd=tmp_path, env=environment(),
                                    stdout=subprocess.DEVNULL, stderr=(tmp_path / "straight.log").open("w"))
    deadline = time.monotonic() + 600
    while not (run_dir / "last.ckpt").exists():  # atomic: present means complete
        assert victim.poll() is None, (tmp_path / "victim.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert straight_run.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    killed_at = _load(run_dir / "last.ckpt")["global_step"]
    assert EVERY <= killed_at < MAX_STEPS

    run_fit(resumed, tmp_path, "--ckpt_path", "last")
    a, b = _load(tmp_path / "straight" / "last.ckpt"), _load(run_dir / "last.ckpt")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys() and len(a["state_dict"]) > 300
    _assert_same_tensors(a["state_dict"], b["state_dict"], "state_dict")
    _assert_same_tensors(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == MAX_STEPS
    loader = a["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader == b["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 2, "batches_seen": 2}]
