"""The 4-bit and 8-bit (bitsandbytes) comprehension paths load and train LoRA on the CPU."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from insightedit.models.comprehension import build_comprehension

INSTRUCTIONS = ["Remove the red circle.", "add a blue square in the top left"]
LINEAR = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}


@pytest.fixture(autouse=True, scope="module")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSIGHTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "insightedit-cache"))
        yield


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_tiny_loads_and_trains_lora(quantization: str):
    torch.manual_seed(0)
    model = build_comprehension("tiny", quantization=quantization, gradient_checkpointing=True).train()
    language = model.base_model.model.language_model
    vision = model.base_model.model.vision_tower
    q_proj = language.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, LINEAR[quantization])  # the LLM is quantized ...
    assert type(vision.encoder.layers[0].self_attn.q_proj) is nn.Linear  # ... the vision tower is not
    assert type(model.output_rows.base) is nn.Linear
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(names) == 2 * 4 * 2 + 2 and all("lora_" in n or n.endswith("new_rows") for n in names)
    quantized_before = q_proj.base_layer.weight.detach().clone()
    old_rows = model.input_rows.base.weight.detach().clone()
    lora_b = q_proj.lora_B["default"].weight
    rows = model.input_rows.new_rows.detach().clone()
    groups = model.trainable_parameter_groups()
    optimizer = torch.optim.AdamW([p for g in groups.values() for p in g], lr=1e-2, weight_decay=0.1)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        out = model(pixels, INSTRUCTIONS)
        assert out.h.shape == (2, 32, 64) and out.vision_features.shape == (2, 64, 64)  # an 8x8 grid of 4-px patches
        out.loss_llm.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss_llm.item())
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert lora_b.abs().max() > 0  # LoRA B starts at zero and has trained
    assert (model.input_rows.new_rows - rows).abs().max() > 1e-3
    assert torch.equal(q_proj.base_layer.weight, quantized_before)
    assert torch.equal(model.input_rows.base.weight, old_rows)
