"""The comprehension LightningModule trains on its own with ``L_LLM`` and checkpoints only what trains."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from insightedit.systems.comprehension import ComprehensionModule

INSTRUCTIONS = ["Remove the red circle.", "add a blue square in the top left", "Turn the star green."]


@pytest.fixture(autouse=True, scope="module")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSIGHTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "insightedit-cache"))
        yield


def samples(count: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"mllm_source": torch.randn(3, 32, 32, generator=generator), "instruction": INSTRUCTIONS[i % 3]}
        for i in range(count)
    ]


def test_module_fits_logs_loss_and_checkpoints_only_trainable_weights(tmp_path):
    torch.manual_seed(0)
    module = ComprehensionModule(preset="tiny", learning_rate=1e-2, mm_learning_rate=5e-2, weight_decay=0.01)
    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["lora", "mm_embeddings"]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 5e-2]
    old_rows = module.model.input_rows.base.weight.detach().clone()
    assert all(m.training for m in module.modules())  # LoRA dropout is live in training
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        limit_val_batches=1,
    )
    loader = DataLoader(samples(), batch_size=4)
    trainer.fit(module, loader, val_dataloaders=loader)
    assert math.isfinite(trainer.callback_metrics["train/loss_llm"].item())
    assert math.isfinite(trainer.callback_metrics["val/loss_llm"].item())
    assert torch.equal(module.model.input_rows.base.weight, old_rows)

    path = tmp_path / "comprehension.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert set(state) == trainable and len(state) == 18  # 16 LoRA matrices + 2 [MM] row blocks
    restored = ComprehensionModule.load_from_checkpoint(path).eval()
    module.eval()
    batch = next(iter(loader))
    with torch.no_grad():
        h = module(batch["mllm_source"], batch["instruction"], compute_loss=False).h
        assert torch.equal(restored(batch["mllm_source"], batch["instruction"], compute_loss=False).h, h)
