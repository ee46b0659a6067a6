"""NaN/Inf losses: the step is skipped (weights and AdamW state untouched) and counted; too many in a row stop."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from insightedit.callbacks import NonFiniteGuard, TrainingDiverged


class Poisoned(L.LightningModule):
    def __init__(self, bad_steps: set[int]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_steps = bad_steps
        self.weights: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        self.weights[self.global_step] = self.layer.weight.detach().clone()
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step in self.bad_steps else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _fit(module, guard, steps, tmp_path):
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        callbacks=[guard], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, data)
    return trainer


def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path):
    module, guard = Poisoned(bad_steps={2, 3}), NonFiniteGuard(max_consecutive=3)
    trainer = _fit(module, guard, 6, tmp_path)
    assert guard.skipped == 2 and guard.consecutive == 0
    assert torch.equal(module.weights[3], module.weights[2]) and torch.equal(module.weights[4], module.weights[2])
    assert not torch.equal(module.weights[5], module.weights[4])  # training goes on after the bad steps
    assert all(torch.isfinite(w).all() for w in module.weights.values())
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 2
    assert "train/skipped_nonfinite" in next(tmp_path.rglob("metrics.csv")).read_text()
    assert guard.state_dict() == {"skipped": 2, "consecutive": 0}


def test_too_many_nonfinite_steps_in_a_row_stop_with_one_clear_message(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"training diverged: 3 consecutive steps had a NaN/Inf") as caught:
        _fit(Poisoned(bad_steps=set(range(1, 100))), NonFiniteGuard(max_consecutive=3), 20, tmp_path)
    assert "\n" not in str(caught.value) and caught.value.exit_code == 1


def test_an_infinite_gradient_with_a_finite_loss_is_skipped_too(tmp_path):
    class InfGrad(Poisoned):
        def on_after_backward(self):
            if self.global_step == 1:
                self.layer.bias.grad.fill_(float("inf"))

    module, guard = InfGrad(bad_steps=set()), NonFiniteGuard(max_consecutive=3)
    _fit(module, guard, 3, tmp_path)
    assert guard.skipped == 1 and torch.equal(module.weights[2], module.weights[1])
