"""The comprehension model on the tiny twin (and the full preset on the meta device)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from insightedit.models.comprehension import build_comprehension, build_llava
from insightedit.models.comprehension.presets import FULL_PARAMETERS, tiny_llava_config, write_tiny_llava
from insightedit.models.comprehension.tiny_tokenizer import train_tiny_tokenizer
from insightedit.models.comprehension.tokens import mean_row
from insightedit.models.loading import load_pretrained

INSTRUCTIONS = ["Remove the red circle.", "add a blue square in the top left"]
LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PREFIX = "llava.base_model.model."


@pytest.fixture(autouse=True, scope="module")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSIGHTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "insightedit-cache"))
        yield


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (B, 3, 32, 32)


def expected_trainable(modules=LAYER_MODULES, layers: int = 2) -> set[str]:
    names = {
        f"{PREFIX}model.language_model.layers.{i}.{m}.lora_{ab}.default.weight"
        for i in range(layers)
        for m in modules
        for ab in "AB"
    }
    return names | {f"{PREFIX}model.language_model.embed_tokens.new_rows", f"{PREFIX}lm_head.new_rows"}


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def test_forward_shapes_loss_and_vision_features():
    model = build_comprehension("tiny").eval()
    assert (model.hidden_size, model.vision_hidden_size, model.num_mm_tokens) == (64, 64, 32)
    assert model.vision_grid == (8, 8) and model.image_size == 32
    pixels = images()
    out = model(pixels, INSTRUCTIONS)
    assert out.h.shape == (2, 32, 64)
    assert out.vision_features.shape == (2, 64, 64)
    assert out.loss_llm is not None and math.isfinite(out.loss_llm.item()) and out.loss_llm.item() > 0
    # The patch features are LLaVA's own choice: vision layer -2, CLS dropped, before the projector.
    with torch.no_grad():
        tower = model.base_model.model.vision_tower(pixels, output_hidden_states=True)
    assert torch.equal(out.vision_features, tower.hidden_states[-2][:, 1:])
    assert model(pixels, INSTRUCTIONS, compute_loss=False).loss_llm is None
    out.loss_llm.backward()
    grads = {name: p.grad for name, p in trainable(model).items()}
    assert all(grad is not None for grad in grads.values())
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if "lora_B" in name or "new_rows" in name)


def test_h_depends_on_instruction_and_image_not_on_padding():
    model = build_comprehension("tiny").eval()
    pixels = images(1).expand(2, -1, -1, -1)
    with torch.no_grad():
        h = model(pixels, INSTRUCTIONS, compute_loss=False).h  # (2, r, d)
        h_other_image = model(images(1, seed=1), INSTRUCTIONS[:1], compute_loss=False).h
        alone = model(pixels[:1], INSTRUCTIONS[:1], compute_loss=False).h
    assert (h[0] - h[1]).abs().max() > 1e-3  # same image, different instruction
    assert (h[0] - h_other_image[0]).abs().max() > 1e-3  # same instruction, different image
    torch.testing.assert_close(alone[0], h[0], atol=1e-5, rtol=1e-5)  # batched with padding = alone


def test_exactly_lora_and_mm_rows_train():
    model = build_comprehension("tiny")
    params = trainable(model)
    assert set(params) == expected_trainable()
    assert sum(p.numel() for p in params.values()) == 2 * 4 * 2 * 8 * 64 + 2 * 32 * 64 == 12288
    groups = model.trainable_parameter_groups()
    assert len(groups["lora"]) == 16 and len(groups["mm_embeddings"]) == 2
    assert {id(p) for g in groups.values() for p in g} == {id(p) for p in params.values()}
    custom = build_comprehension("tiny", lora_rank=4, lora_target_modules=["q_proj", "v_proj", "gate_proj"])
    names = set(trainable(custom))
    assert names == expected_trainable(("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj"))
    assert not any("vision_tower" in name or "multi_modal_projector" in name for name in names)
    assert {n for n, _ in custom.named_modules() if n.endswith("lora_A")} == {
        f"{PREFIX}model.language_model.layers.{i}.{m}.lora_A"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj")
    }
    rows_only = build_comprehension("tiny", lora_rank=0)
    assert sum(p.numel() for p in trainable(rows_only).values()) == 2 * 32 * 64


def test_mm_rows_move_and_everything_else_stays_bit_for_bit():
    torch.manual_seed(0)
    model = build_comprehension("tiny").train()
    embedding, head = model.input_rows, model.output_rows
    assert torch.equal(embedding.new_rows[5], embedding.base.weight.mean(dim=0))  # mean init
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in trainable(model)}
    rows_before = [embedding.new_rows.detach().clone(), head.new_rows.detach().clone()]
    groups = model.trainable_parameter_groups()
    # Weight decay on, on purpose: it must not reach the old rows, which are not in the optimizer.
    optimizer = torch.optim.AdamW([p for g in groups.values() for p in g], lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(4):
        loss = model(images(), INSTRUCTIONS).loss_llm
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (embedding.new_rows - rows_before[0]).abs().max() > 1e-3
    assert (head.new_rows - rows_before[1]).abs().max() > 1e-3
    after = model.state_dict()
    changed = [k for k, v in frozen.items() if not torch.equal(v, after[k])]
    assert changed == []  # old embedding and head rows, vision tower, LLM weights: not one bit moved
    assert f"llava.{PREFIX[6:]}model.language_model.embed_tokens.base.weight" in frozen


def test_save_trainable_then_fresh_build_load_gives_identical_h(tmp_path):
    torch.manual_seed(0)
    model = build_comprehension("tiny").train()
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    for _ in range(2):
        model(images(), INSTRUCTIONS).loss_llm.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    directory = model.save_trainable(tmp_path / "comprehension")
    files = sorted(p.name for p in directory.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "mm_embeddings.safetensors"} <= set(files)
    assert sum(p.stat().st_size for p in directory.iterdir()) < 200_000  # no frozen base inside
    torch.manual_seed(123)
    fresh = build_comprehension("tiny").eval()
    with torch.no_grad():
        h = model(images(), INSTRUCTIONS, compute_loss=False).h
        assert not torch.equal(fresh(images(), INSTRUCTIONS, compute_loss=False).h, h)
        fresh.load_trainable(directory)
        assert torch.equal(fresh(images(), INSTRUCTIONS, compute_loss=False).h, h)
    with pytest.raises(ValueError, match="another"):
        build_comprehension("tiny", num_mm_tokens=8).load_trainable(directory)


def test_pretrained_folder_loads_the_same_tiny_model(tmp_path):
    folder = write_tiny_llava(tmp_path / "tiny-llava")
    torch.manual_seed(0)
    from_config = build_comprehension("tiny").eval()
    torch.manual_seed(0)
    from_folder = build_comprehension("tiny", pretrained=str(folder))
    assert next(from_folder.base_model.parameters()).is_meta  # built from the folder's config, no weight read
    assert load_pretrained(from_folder) == [""] and load_pretrained(from_folder) == []  # loaded once
    from_folder.eval()
    with torch.no_grad():
        a = from_config(images(), INSTRUCTIONS)
        b = from_folder(images(), INSTRUCTIONS)
    assert torch.equal(a.h, b.h) and torch.equal(a.loss_llm, b.loss_llm)


def test_llava_hf_layout_with_padded_embedding_rows(tmp_path):
    # llava-hf's matrix has 32064 rows for 32002 tokens: the [MM] ids land inside the padded rows.
    tokenizer = train_tiny_tokenizer()
    config = tiny_llava_config(tokenizer)
    config.text_config.vocab_size = len(tokenizer) + 40
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    model = build_comprehension("tiny", pretrained=str(tmp_path))
    model.load_pretrained()
    assert model.first_mm_id == len(tokenizer) and model.output_rows.vocab_size == len(tokenizer) + 40
    old_rows = model.input_rows.base.weight.detach().clone()
    assert torch.equal(model.input_rows.new_rows[0], mean_row(old_rows, len(tokenizer), 1)[0])
    out = model(images(), INSTRUCTIONS)
    assert out.h.shape == (2, 32, 64) and math.isfinite(out.loss_llm.item())
    out.loss_llm.backward()
    assert model.input_rows.new_rows.grad.abs().sum() > 0 and model.input_rows.base.weight.grad is None


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_comprehension("tiny", lora_dropout=0.0, gradient_checkpointing=checkpointing).train()
        assert model.base_model.is_activation_checkpointing == checkpointing
        loss = model(images(), INSTRUCTIONS).loss_llm
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainable(model).values()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, recomputed in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(plain, recomputed)


def test_full_preset_on_meta_is_llava_15_7b_with_no_memory():
    base = build_llava("full")
    parameters = list(base.model.parameters())
    assert sum(p.numel() for p in parameters) == FULL_PARAMETERS == 7_063_427_072
    tensors = parameters + list(base.model.buffers())
    assert all(t.is_meta for t in tensors)
    assert sum(t.numel() * t.element_size() for t in tensors if not t.is_meta) == 0
    model = build_comprehension("full")
    assert all(p.is_meta for p in model.parameters())
    assert (model.hidden_size, model.vision_hidden_size, model.vision_grid, model.image_size) == (
        4096,
        1024,
        (24, 24),
        336,
    )
    lora = 32 * 4 * 2 * 8 * 4096
    rows = 2 * 32 * 4096
    assert sum(p.numel() for p in trainable(model).values()) == lora + rows == 8_650_752
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMETERS + lora + rows
    assert model.first_mm_id == 32002
    with pytest.raises(RuntimeError, match="meta"):
        model(torch.zeros(1, 3, 336, 336), ["x"])
