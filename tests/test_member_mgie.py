"""MGIE in the zoo: prompts with an expressive instruction, what each stage trains, its losses, edits, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from insightedit.errors import UserError
from insightedit.models.comprehension.prompts import IGNORE_INDEX, IMAGE_TOKEN
from insightedit.models.members.mgie import EditHead, MGIEEditor, build_mgie
from insightedit.models.zoo import build_editor, get_member
from insightedit.pipeline import EditPipeline
from insightedit.systems.editor_system import EditorSystem

# lightning_configs/tiny/mgie.yaml's settings
TINY_RATES = {"lora": 1.0e-3, "head": 1.0e-3, "unet": 5.0e-4}
TINY_MLLM = {"num_mm_tokens": 8, "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0}


def make_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "source": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "target": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "mllm_source": torch.randn(2, 3, 32, 32, generator=g),
        "instruction": ["remove the red circle", "the object the colour of the sky: make it red"],
        "plain_instruction": ["remove the red circle", "turn the blue square red"],
    }


def system_at(stage: int) -> EditorSystem:
    torch.manual_seed(0)
    settings = {"learning_rates": TINY_RATES}
    return EditorSystem(member="mgie", preset="tiny", stage=stage, stage_settings=settings, comprehension=TINY_MLLM)


@pytest.fixture(scope="module")
def stage3() -> EditorSystem:
    return system_at(3)


def head_parameters(d_llm: int, text_dim: int, width: int, ff: int, encoders: int, decoders: int, queries: int) -> int:
    """The edit head's size by hand: in/out projections, queries, pre-norm encoder and decoder layers."""
    attention = 4 * width * width + 4 * width  # fused q/k/v projection + output projection, with biases
    feed_forward = 2 * width * ff + ff + width
    norm = 2 * width
    encoder_layer = attention + feed_forward + 2 * norm
    decoder_layer = 2 * attention + feed_forward + 3 * norm  # self- and cross-attention
    return (
        d_llm * width + width  # in_proj
        + queries * width
        + encoders * encoder_layer + norm  # final encoder norm
        + decoders * decoder_layer + norm  # final decoder norm
        + width * text_dim + text_dim  # out_proj
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ prompts
def test_the_expressive_instruction_and_visual_tokens_are_labelled_and_nothing_else(stage3):
    mllm = stage3.editor.comprehension
    batch = make_batch()
    encoded = mllm.encode(batch["instruction"], answers=batch["plain_instruction"])
    r = mllm.num_mm_tokens
    visual = "".join(f"[MM{i}]" for i in range(r))
    for row, explicit in enumerate(batch["plain_instruction"]):
        labelled = encoded.labels[row][encoded.labels[row] != IGNORE_INDEX]
        assert mllm.tokenizer.decode(labelled) == f"{explicit} {visual}"
        assert torch.equal(encoded.labels[row][encoded.mm_mask[row]], torch.tensor(mllm.prompts.mm_token_ids))
    alone = mllm.encode(batch["instruction"])  # without an answer: the [MM] tokens alone, as before
    assert torch.equal(alone.labels != IGNORE_INDEX, alone.mm_mask)


def test_llm_loss_is_the_nll_of_the_explicit_text_and_the_visual_tokens(stage3):
    mllm = stage3.editor.comprehension
    batch = make_batch()
    with torch.no_grad():
        out = mllm(batch["mllm_source"], batch["instruction"], answers=batch["plain_instruction"])
        encoded = mllm.encode(batch["instruction"], answers=batch["plain_instruction"])
        logits = mllm.base_model(  # the full model's logits at every position, shifted by hand
            input_ids=encoded.input_ids,
            pixel_values=batch["mllm_source"],
            attention_mask=encoded.attention_mask,
            position_ids=encoded.position_ids,
            vision_feature_layer=mllm.vision_feature_layer,
        ).logits
    reference = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), encoded.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    assert out.loss_llm is not None
    torch.testing.assert_close(out.loss_llm, reference, rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_the_cache_equals_recomputing_every_step(stage3):
    mllm = stage3.editor.comprehension.train()
    batch = make_batch()
    steps = 6
    written = mllm.generate_answers(batch["mllm_source"], batch["instruction"], max_new_tokens=steps)
    assert all(module.training for module in mllm.modules())  # it writes in eval mode, then restores the mode
    mllm.eval()
    stop = {*mllm.prompts.mm_token_ids, mllm.eos_token_id}
    banned = [mllm.prompts.image_token_id, mllm.tokenizer.pad_token_id, mllm.tokenizer.bos_token_id]
    for row, instruction in enumerate(batch["instruction"]):
        ids = mllm.prompts.heads([instruction]).input_ids
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(steps):
                hidden = mllm.base_model.model(
                    input_ids=ids,
                    pixel_values=batch["mllm_source"][row : row + 1],
                    vision_feature_layer=mllm.vision_feature_layer,
                ).last_hidden_state
                logits = mllm.output_rows(hidden[:, -1]).float()
                logits[:, banned] = -torch.inf
                token = logits.argmax(-1)
                if int(token) in stop:
                    break
                ids = torch.cat([ids, token[:, None]], dim=1)
        text = mllm.tokenizer.decode(ids[0, start:], skip_special_tokens=True)
        for reserved in (IMAGE_TOKEN, *mllm.mm_tokens):  # as generate_answers: pieces spelling one are not text
            text = text.replace(reserved, " ")
        assert written[row] == " ".join(text.split())
    assert mllm.generate_answers(batch["mllm_source"], batch["instruction"], max_new_tokens=0) == ["", ""]
    mllm.train()


# ------------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("stage", [1, 2])
def test_stages_one_and_two_train_their_groups(stage):
    system = system_at(stage)
    groups = system.parameter_groups()
    train = {1: ("mm_embeddings", "lora", "edit_head"), 2: ("edit_head", "unet")}[stage]
    assert system.stage.train == train
    assert system.trainable_names() == {name for group in train for name in groups[group]}
    weights = {1: {"llm": 1.0, "align": 1.0}, 2: {"diff": 1.0}}[stage]
    assert system.stage.loss_weights == weights and system.stage.use_unet == (stage == 2)


def test_a_stage3_step_trains_exactly_the_mgie_groups(stage3):
    system = stage3
    groups = system.parameter_groups()
    assert tuple(groups) == ("mm_embeddings", "lora", "edit_head", "unet")
    names = {n for n, _ in system.named_parameters()}
    by_prefix = {
        "mm_embeddings": {n for n in names if n.startswith("editor.comprehension.") and n.endswith("new_rows")},
        "lora": {n for n in names if n.startswith("editor.comprehension.") and "lora_" in n},
        "edit_head": {n for n in names if n.startswith("editor.head.")},
        "unet": {n for n in names if n.startswith("editor.generation.unet.")},
    }
    assert {group: set(members) for group, members in groups.items()} == by_prefix
    # tensors: input + output rows; LoRA A/B on q, k, v, o of 2 layers; the head (in, queries, 1 encoder
    # layer of 12 + norm 2, 1 decoder layer of 18 + norm 2, out); the tiny UNet
    counts = {"mm_embeddings": 2, "lora": 16, "edit_head": 2 + 1 + 14 + 20 + 2, "unet": 208}
    assert {group: len(members) for group, members in groups.items()} == counts
    tiny_head = head_parameters(64, 32, width=48, ff=96, encoders=1, decoders=1, queries=77)
    assert tiny_head == 56_000
    elements = {"mm_embeddings": 2 * 8 * 64, "lora": 2 * 4 * 8 * (64 + 64), "edit_head": tiny_head}
    for group, expected in elements.items():
        assert sum(p.numel() for p in groups[group].values()) == expected, group
    trainable = system.trainable_names()
    assert trainable == set().union(*by_prefix.values())
    frozen = names - trainable
    assert any("vision_tower" in n for n in frozen)
    assert any(n.startswith("editor.generation.text_encoder.") for n in frozen)

    before = {n: p.detach().clone() for n, p in system.named_parameters()}
    optimizer = system.configure_optimizers()["optimizer"]
    assert [group["name"] for group in optimizer.param_groups] == ["lora", "head", "unet"]
    system.train()
    losses = system.compute_losses(make_batch())
    losses["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    changed = {n for n, p in system.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    for group, members in by_prefix.items():
        assert members & changed, group  # every group moved (LoRA's A waits for B to leave zero)
    assert by_prefix["edit_head"] <= changed and by_prefix["mm_embeddings"] <= changed


def test_losses_are_finite_weighted_as_mgie_and_align_is_the_text_encoder_mse(stage3):
    batch = make_batch(1)
    losses = stage3.compute_losses(batch)
    assert set(losses) == {"llm", "diff", "loss"}
    assert all(torch.isfinite(value) for value in losses.values())
    torch.testing.assert_close(losses["loss"], losses["llm"] + 0.5 * losses["diff"])  # MGIE's weights

    stage1 = system_at(1)
    losses1 = stage1.compute_losses(batch)
    assert set(losses1) == {"llm", "align", "loss"}
    editor = stage1.editor
    with torch.no_grad():
        f_txt = editor.conditions(batch, (8, 8)).f_txt
        target = editor.generation.text_encoder(batch["plain_instruction"])
    assert f_txt.shape == target.shape == (2, 77, 32)
    torch.testing.assert_close(losses1["align"], F.mse_loss(f_txt, target))
    torch.testing.assert_close(losses1["loss"], losses1["llm"] + losses1["align"])


def test_llm_loss_decreases_over_ten_steps_on_one_batch():
    system = system_at(1)  # the MLLM and the head (stage 3 adds the UNet, which L_LLM does not reach)
    optimizer = system.configure_optimizers()["optimizer"]
    system.train()
    batch = make_batch(2)
    history = []
    for _ in range(10):
        losses = system.compute_losses(batch)
        assert all(torch.isfinite(value) for value in losses.values())
        history.append(losses["llm"].item())
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert history[-1] < history[0] - 0.1, history


# ------------------------------------------------------------------------------------------- edits
def test_inference_writes_the_expressive_instruction_then_reads_the_visual_tokens(stage3):
    editor: MGIEEditor = stage3.editor.eval()
    batch = make_batch(3)
    del batch["plain_instruction"]
    with torch.no_grad():
        written = editor.expressive_instructions(batch["mllm_source"], batch["instruction"])
        at_inference = editor.conditions(batch, (8, 8)).f_txt
        forced = editor.conditions({**batch, "plain_instruction": written}, (8, 8)).f_txt
    assert all(isinstance(text, str) for text in written)
    torch.testing.assert_close(at_inference, forced, rtol=0, atol=0)
    editor.train()


def test_edit_is_reproducible_with_a_seed_and_changes_the_source(stage3):
    editor = stage3.editor.eval()
    batch = make_batch(4)

    def edit() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return editor.edit(
            batch["source"], batch["mllm_source"], batch["instruction"], num_inference_steps=2, generator=generator
        )

    first, again = edit(), edit()
    assert torch.equal(first, again)
    assert (first - batch["source"]).abs().mean() > 0.05
    editor.train()


def test_export_and_load_edit_the_same(stage3, tmp_path):
    pipe = EditPipeline.from_system(stage3, resolution=32)
    folder = pipe.save_pretrained(tmp_path / "mgie")
    loaded = EditPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    assert loaded.member == "mgie" and isinstance(loaded.editor, MGIEEditor)
    assert loaded.editor.head.get_config() == stage3.editor.head.get_config()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    kwargs = {"num_inference_steps": 2, "seed": 0, "output_type": "pt"}
    ours = pipe(image, "remove the red circle", **kwargs).images[0]
    theirs = loaded(image, "remove the red circle", **kwargs).images[0]
    torch.testing.assert_close(ours, theirs)
    stage3.editor.train()


# ------------------------------------------------------------------------------------- full size
def test_full_size_on_meta_has_mgie_s_edit_head():
    editor = build_editor("mgie", "full")
    assert isinstance(editor, MGIEEditor) and get_member("mgie").editor_class() is MGIEEditor
    groups = editor.parameter_groups()
    count = {group: sum(p.numel() for p in members) for group, members in groups.items()}
    reference = head_parameters(4096, 768, width=512, ff=2048, encoders=4, decoders=4, queries=77)
    assert reference == 31_958_784
    assert count["edit_head"] == reference
    assert count["mm_embeddings"] == 2 * 8 * 4096  # 8 [IMG] tokens, input and output rows
    assert count["lora"] == 32 * 4 * 8 * (4096 + 4096)  # rank 8 on q, k, v, o of 32 layers
    assert all(p.is_meta for p in editor.head.parameters())
    with torch.device("meta"):
        f_txt = editor.head(torch.zeros(2, 8, 4096), torch.zeros(8, 4096))
    assert f_txt.shape == (2, 77, 768)


def test_bad_sections_are_user_errors():
    with pytest.raises(UserError, match="unknown head settings"):
        build_mgie("tiny", head={"layers": 2})
    with pytest.raises(UserError, match="no image branch"):
        build_mgie("tiny", generation={"image_embed_dim": 32})
    with pytest.raises(ValueError, match="expressive_tokens"):
        EditHead(64, 32, expressive_tokens=-1)
