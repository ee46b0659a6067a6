"""A clean tiny ``fit`` prints its progress and what it wrote, no warning; real warnings still show."""

import importlib.util
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from _training_runs import REPO, TINY3, environment
from lightning.pytorch.callbacks import Callback

from insightedit.cli import main
from insightedit.console import KNOWN_WARNINGS, _DropPrefixes, quiet_fresh_checkpoint_folders, quiet_library_noise

REAL_WARNING = "a real warning from user code"
WARNING_LINE = re.compile(r"warn|deprecat|tip:|flops", re.IGNORECASE)
KNOWN_NOISE = (  # each item of issue 16's list, as it read on the console
    "is_gradient_checkpointing", "litlogger", "LeafSpec", "in eval mode at the start", "anonymous setting",
    "git root", "exists and is not empty", "Total FLOPs", "kernels-community", "Epoch 0/-2",
)  # fmt: skip


class WarnOnce(Callback):
    """Test probe: user code that warns once when training starts (it must reach the console)."""

    def on_train_start(self, trainer, pl_module) -> None:
        warnings.warn(REAL_WARNING, UserWarning, stacklevel=1)


def test_clean_tiny_fit_prints_no_warning_lines(tmp_path):
    """The tiny stage-3 config with W&B offline, its checkpoints and default callbacks, 3 steps, output to a pipe."""
    command = [
        sys.executable, "-m", "insightedit", "fit", "--config", str(TINY3),
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--data.init_args.root={tmp_path / 'data'}", "--data.init_args.synthetic={num_images: 16, size: 32, seed: 0}",
        "--data.init_args.batch_size=2", "--trainer.callbacks+=test_console_output.WarnOnce",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    lines = output.splitlines()
    ours = (REAL_WARNING, "warnings.warn(REAL_WARNING")  # the warning and the source line Python shows with it
    noise = [line for line in lines if WARNING_LINE.search(line) and not any(text in line for text in ours)]
    assert noise == [], output
    assert [known for known in KNOWN_NOISE if known in output] == [], output
    assert any(f"UserWarning: {REAL_WARNING}" in line for line in lines), output  # a real warning still shows
    # not a terminal: plain progress lines, steps counted against max_steps
    steps = [line.split(" | ")[:2] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps[0] == ["step 1/3 (33%)", "epoch 0"] and steps[-1] == ["step 3/3 (100%)", "epoch 0"], output
    assert all(step.startswith("step ") and step.split()[1].endswith("/3") for step, _ in steps)
    assert any(line.startswith("validation at step 3 | 1 batches in ") for line in result.stdout.splitlines())
    assert (tmp_path / "run" / "last.ckpt").is_file() or any((tmp_path / "run").rglob("last.ckpt"))


# (message, category, module) as the libraries issue them
LIBRARY_NOTICES = [
    ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
     "instead.", FutureWarning, "transformers.modeling_utils"),
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
     "instead.", FutureWarning, "lightning.pytorch.utilities._pytree"),
    ("Found 60 module(s) in eval mode at the start of training. This may lead to unexpected behavior during "
     "training.", UserWarning, "lightning.pytorch.loops.fit_loop"),
    ("predict returned None if it was on purpose, ignore this warning...", UserWarning,
     "lightning.pytorch.loops.prediction_loop"),
]  # fmt: skip


def test_filters_are_narrow():
    """Each known notice is silenced from its own module only; a user's warning and other deprecations show."""
    assert len(LIBRARY_NOTICES) == len(KNOWN_WARNINGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        for message, category, module in LIBRARY_NOTICES:
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
        assert caught == []
        for message, category, _ in LIBRARY_NOTICES:  # the same text from elsewhere is not theirs: shown
            warnings.warn_explicit(message, category, "user_code.py", 1, module="user_code")
        warnings.warn(REAL_WARNING, UserWarning, stacklevel=1)
        warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
    expected = [message for message, _, _ in LIBRARY_NOTICES] + [REAL_WARNING, "some other deprecation"]
    assert [str(w.message) for w in caught] == expected


BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
KERNELS_NOTICE = (  # kernels >= 0.19, offline, before bitsandbytes gives up on its optional CPU kernel
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub "
    "is in offline mode."
)


def test_pipeline_import_installs_the_filters():
    """Importing :mod:`insightedit.pipeline` (the Python API) installs the log filters."""
    import insightedit.pipeline

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    for existing in [f for f in logger.filters if isinstance(f, _DropPrefixes)]:
        logger.removeFilter(existing)
    importlib.reload(insightedit.pipeline)
    assert [f.prefixes for f in logger.filters if isinstance(f, _DropPrefixes)] == [(BNB_NOTICE,)]


@pytest.mark.slow  # a fresh interpreter importing the pipeline: ~25 s of CPU
def test_pipeline_import_drops_the_bitsandbytes_notice():
    """The Python API: importing the pipeline installs the filters before bitsandbytes announces itself."""
    source = Path(importlib.util.find_spec("bitsandbytes").origin).parent / "backends" / "cpu" / "ops.py"
    assert BNB_NOTICE in source.read_text()  # the notice still exists (else this test proves nothing)
    code = "import insightedit.pipeline, bitsandbytes"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "kernels" not in result.stdout + result.stderr, result.stderr


def test_the_command_drops_only_known_log_records(caplog):
    """``insightedit`` installs the log filters; other records of the same loggers pass."""
    main(["--version"])
    with caplog.at_level(logging.INFO):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(BNB_NOTICE + ": %s. Please ...", "No module")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes warning")
        logging.getLogger("kernels._internals.hf_hub").warning(KERNELS_NOTICE)
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'someone/else'")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: For seamless cloud logging, try ...")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == [
        "a real bitsandbytes warning", "Skipping publisher trust check for 'someone/else'",
        "GPU available: False, used: False",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "holds_checkpoint, resuming, shown", [(False, False, False), (True, False, True), (True, True, False)]
)
def test_checkpoint_folder_warning_only_beside_another_runs_checkpoints(tmp_path, holds_checkpoint, resuming, shown):
    """config.yaml and wandb/ (a first run) or a resume: silent; a new run beside checkpoints: the warning shows."""
    (tmp_path / "config.yaml").write_text("{}")
    if holds_checkpoint:
        (tmp_path / "last.ckpt").write_bytes(b"")
    ours = f"Checkpoint directory {tmp_path} exists and is not empty."
    other = f"Checkpoint directory {tmp_path}-other exists and is not empty."  # another folder: never silenced
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_fresh_checkpoint_folders([str(tmp_path)], resuming)
        for message in (ours, other):
            warnings.warn_explicit(message, UserWarning, "model_checkpoint.py", 1,
                                   module="lightning.pytorch.callbacks.model_checkpoint")
    assert [str(w.message) for w in caught] == ([ours] if shown else []) + [other]
