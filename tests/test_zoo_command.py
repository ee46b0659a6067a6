"""``insightedit zoo``: every member counted at full size on meta, checked against hand counts and references."""

import json
from pathlib import Path

import pytest
import torch
from test_plan import SD_TEXT_ENCODER, SD_VAE, reference_llava, reference_unet

from insightedit.cli import main
from insightedit.commands.zoo import format_table, summarize
from insightedit.models.zoo import MEMBERS

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"

D_LLM, LAYERS, RANK, TEXT = 4096, 32, 8, 768
LORA = LAYERS * 4 * RANK * (D_LLM + D_LLM)  # r = 8 on q, k, v, o: A (r x d) + B (d x r)
# IP-Adapter's image branch on SD1.5: ImageProjection(768 -> 4 tokens) + LayerNorm, and to_k_ip / to_v_ip (no
# bias) in each of the 16 cross-attention layers (widths 320, 640, 1280 down; 1280 mid; 1280, 640, 320 up)
CROSS_ATTENTION_WIDTHS = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
IMAGE_BRANCH = (TEXT * 4 * TEXT + 4 * TEXT) + 2 * TEXT + sum(2 * TEXT * width for width in CROSS_ATTENTION_WIDTHS)


def edit_head(width=512, heads_ff=2048, layers=4, queries=77) -> int:
    """MGIE's edit head by hand: in/out projections, queries, a pre-norm 4 + 4-layer transformer."""
    attention = 4 * width * width + 4 * width  # packed q/k/v projection + output projection, with biases
    mlp = 2 * width * heads_ff + heads_ff + width
    encoder_layer = attention + mlp + 2 * 2 * width
    decoder_layer = 2 * attention + mlp + 3 * 2 * width
    stacks = layers * encoder_layer + layers * decoder_layer + 2 * 2 * width  # + each stack's final LayerNorm
    return (D_LLM * width + width) + queries * width + stacks + (width * TEXT + TEXT)


@pytest.fixture(scope="module")
def zoo():
    """Every member, counted once (about 20 s of CPU: LLaVA-7B and the UNet built on meta five times)."""
    return {name: summarize(name) for name in MEMBERS}


def test_hand_counts_of_the_parts():
    assert LORA == 8_388_608 and IMAGE_BRANCH == 21_533_184 and edit_head() == 31_958_784


def test_instruct_pix2pix_by_the_command_equals_the_diffusers_and_transformers_references(capsys):
    assert main(["zoo", "--member", "instruct_pix2pix", "--json"]) == 0
    member = json.loads(capsys.readouterr().out)
    unet = reference_unet()
    assert member["total"] == unet + SD_VAE + SD_TEXT_ENCODER == 1_066_246_827
    assert member["trainable"] == unet and member["groups"] == {"unet": unet}
    assert [(s["number"], s["name"], s["train"], s["trainable"]) for s in member["stages"]] == [
        (n, "edit", ["unet"], unet) for n in (1, 2, 3)
    ]
    assert member["stages"][-1]["loss_weights"] == {"diff": 1.0} and member["unavailable"] is None
    assert main(["zoo", "--member", "instruct_pix2pix"]) == 0  # the text view of the same numbers
    text = capsys.readouterr().out
    assert f"{unet + SD_VAE + SD_TEXT_ENCODER:,} in all; {unet:,} trained in the final stage" in text


def test_insightedit_groups_and_stages(zoo):
    member = zoo["insightedit"]
    assert member.groups["lora"] == LORA and member.groups["mm_embeddings"] == 2 * 32 * D_LLM  # input + head rows
    assert member.groups["unet"] == reference_unet() + IMAGE_BRANCH
    align, edit, full = member.stages
    assert (align.name, align.use_unet, align.train) == ("align", False, ["mm_embeddings", "lora", "qformer", "mapper"])
    assert align.trainable == sum(member.groups[g] for g in align.train) == 83_638_272
    assert edit.trainable == align.trainable + member.groups["unet"] and edit.loss_weights == {
        "llm": 1.0, "iaa": 1.0, "diff": 1.0}  # fmt: skip
    assert full.trainable == member.trainable == sum(member.groups.values()) == 994_966_788
    frozen = reference_llava() + SD_VAE + SD_TEXT_ENCODER + 303_966_208  # + the IAA target's CLIP ViT-L/14 tower
    assert member.total == frozen + member.trainable == 8_569_074_411


def test_members_differ_by_exactly_the_parts_they_leave_out(zoo):
    full = zoo["insightedit"]
    clip_tower = 303_966_208
    without_iaa = full.total - full.groups["mapper"] - IMAGE_BRANCH - clip_tower
    assert zoo["insightedit_no_iaa"].total == zoo["smartedit"].total == without_iaa
    assert zoo["insightedit_no_bim"].total == full.total - full.groups["bim"]
    assert zoo["insightedit_no_bim"].trainable == full.trainable - full.groups["bim"]
    assert zoo["smartedit"].trainable == full.trainable - full.groups["mapper"] - IMAGE_BRANCH
    assert "mapper" not in zoo["smartedit"].groups and "bim" not in zoo["insightedit_no_bim"].groups
    assert zoo["smartedit"].losses == ["llm", "align", "diff"]


def test_mgie_is_llava_with_eight_tokens_an_edit_head_and_the_unet(zoo):
    member = zoo["mgie"]
    unet = reference_unet()
    assert member.groups == {"mm_embeddings": 2 * 8 * D_LLM, "lora": LORA, "edit_head": edit_head(), "unet": unet}
    assert member.total == reference_llava() + SD_VAE + SD_TEXT_ENCODER + sum(member.groups.values())
    final = member.stages[-1]
    assert final.loss_weights == {"llm": 1.0, "diff": 0.5} and final.trainable == member.trainable


def test_the_table_lists_every_member_with_its_counts(zoo):
    table = format_table(list(zoo.values()))
    lines = table.splitlines()
    for name, member in zoo.items():
        row = next(line for line in lines if line.startswith(f"{name} "))
        assert member.paper in row and member.conditions in row
        assert f"{member.total / 1e6:,.1f}M" in row and f"{member.trainable / 1e6:,.1f}M" in row
    assert "    1-3 edit: unet (859.5M); diff" in lines  # InstructPix2Pix: one recipe under three numbers
    assert "    1 align: mm_embeddings, lora, qformer, mapper (83.6M); llm + align + iaa" in lines


def test_unknown_member_is_one_line(capsys):
    assert main(["zoo", "--member", "pix2pix"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown member 'pix2pix'; the zoo has instruct_pix2pix")


# a tiny member's fit end to end, through the CLI, as the zoo lists it (the others: test_configs.py, by hand)
def test_tiny_smartedit_fits_two_steps_and_saves_only_what_it_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([
        "fit", "--config", str(CONFIGS / "tiny" / "smartedit.yaml"), "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--data.init_args.synthetic={num_images: 16, size: 32, seed: 0}", "--data.init_args.batch_size=4",
    ])  # fmt: skip
    assert code == 0
    checkpoint = torch.load(tmp_path / "checkpoints/tiny/smartedit/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["insightedit"]["member"] == "smartedit"
    saved = set(checkpoint["state_dict"])
    assert any(k.startswith("editor.bridging.bim.") for k in saved)
    assert not any(k.startswith(("editor.bridging.mapper.", "editor.generation.unet.image_projection.")) for k in saved)
    assert not any("vision_tower" in k or ".base_layer." in k for k in saved)  # the frozen MLLM stays out
