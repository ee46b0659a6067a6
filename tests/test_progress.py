"""StepProgressBar: optimizer steps against the run's total, plain lines off a terminal; the summary without FLOPs."""

import re

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from insightedit.callbacks import ModelSummaryTable, StepProgressBar


class LoggingModel(BoringModel):
    """BoringModel that logs its loss to the progress bar (as the systems do) and a validation loss."""

    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("train/loss", output["loss"], prog_bar=True)
        return output

    def validation_step(self, batch, batch_idx):
        output = super().validation_step(batch, batch_idx)
        self.log("val/loss", output["x"], prog_bar=True)
        return output


def _fit(tmp_path, bar, **trainer_args):
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[bar], num_sanity_val_steps=0, **trainer_args,
    )
    trainer.fit(LoggingModel())
    return trainer


STEP_LINE = re.compile(r"^step (\d+)/(\d+) \((\d+)%\) \| epoch (\d+) \| ")


def _step_lines(text):
    return [STEP_LINE.match(line) for line in text.splitlines() if line.startswith("step ")]


def test_plain_lines_count_steps_against_max_steps(tmp_path, capsys):
    """max_steps=7 over 3-batch epochs: lines every 2 steps plus the last, each step/7 with its epoch."""
    bar = StepProgressBar(every_n_steps=2, every_n_seconds=None, plain=True)
    _fit(tmp_path, bar, max_steps=7, limit_train_batches=3, limit_val_batches=2, val_check_interval=3)
    out = capsys.readouterr().out
    lines = _step_lines(out)
    assert all(lines), out
    assert [(int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in lines] == [
        (1, 7, 14, 0), (3, 7, 43, 0), (5, 7, 71, 1), (7, 7, 100, 2),  # step, total, percent, epoch
    ]
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert "steps/s" not in step_lines[0] and "ETA" not in step_lines[0]  # no rate from one step
    assert all("steps/s" in line and "ETA" in line and "train/loss " in line for line in step_lines[1:])
    assert step_lines[-1].split("ETA ")[1].startswith("0:00:00")  # nothing left at the last step
    validations = [line for line in out.splitlines() if line.startswith("validation")]
    assert [line.split(" |")[0] for line in validations] == ["validation at step 3", "validation at step 6"]
    assert all("2 batches in" in line and "val/loss " in line and "train/loss" not in line for line in validations)
    assert "Epoch" not in out  # no live bar in plain mode


def test_plain_lines_of_an_epoch_limited_run(tmp_path, capsys):
    """max_epochs=2 of 3 batches: the total is 6 steps (the run's, not the epoch's)."""
    bar = StepProgressBar(every_n_steps=3, every_n_seconds=None, plain=True)
    _fit(tmp_path, bar, max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    lines = _step_lines(capsys.readouterr().out)
    assert [(m[1], m[2], m[4]) for m in lines] == [("1", "6", "0"), ("4", "6", "1"), ("6", "6", "1")]


def test_plain_lines_when_stdout_is_not_a_terminal(tmp_path, capsys):
    """plain=None decides from stdout; under capsys it is not a terminal."""
    bar = StepProgressBar(every_n_seconds=None)
    _fit(tmp_path, bar, max_steps=2, limit_train_batches=5, limit_val_batches=0)
    assert bar.plain
    assert [m[0].split(" |")[0] for m in _step_lines(capsys.readouterr().out)] == ["step 1/2 (50%)", "step 2/2 (100%)"]


def test_live_bar_counts_global_steps_across_epochs(tmp_path):
    """The live bar of a step-limited run: total max_steps, completed global_step, 'Epoch N' with no '/-2'."""
    bar = StepProgressBar(plain=False)
    trainer = _fit(tmp_path, bar, max_steps=5, limit_train_batches=2, limit_val_batches=0)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.total, task.completed, trainer.global_step) == (5, 5, 5) and isinstance(task.total, int)  # "5/5"
    assert task.description.strip() == "Epoch 2"
    bar_epochs = StepProgressBar(plain=False)
    _fit(tmp_path, bar_epochs, max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    task = bar_epochs.progress.tasks[bar_epochs.train_progress_bar_id]
    assert task.description.strip() == "Epoch 1/1" and task.total == 2  # epoch-limited: Lightning's per-epoch bar


@pytest.mark.parametrize("bad", [{"every_n_steps": 0}, {"every_n_seconds": 0}])
def test_bad_schedule(bad):
    with pytest.raises(ValueError, match="every_n_"):
        StepProgressBar(**bad)


def test_summary_without_unmeasured_flops(tmp_path, capsys):
    """No example input: no FLOPs column or total; the parameter counts are Lightning's."""
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ModelSummaryTable()], max_steps=1, limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    model = LoggingModel()
    model.example_input_array = None
    trainer.fit(model)
    out = capsys.readouterr().out
    assert "FLOPs" not in out
    assert re.search(r"Total params: 66\b", out) and "Trainable params: 66" in out  # Linear(32, 2): 32*2 + 2
    assert re.search(r"│ 0 │ layer +│ Linear +│ +66 │ train │", out), out
