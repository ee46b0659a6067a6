"""``generation.text_encoder``: the frozen text encoder read from a CLIP folder (the tiny CLIP foundation's export)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

from insightedit.errors import UserError
from insightedit.models.generation.generator import EditGenerator
from insightedit.models.loading import load_pretrained, pending_parts
from insightedit.models.loads import LOADS_LOGGER
from insightedit.models.text_encoder import tiny_clip_text_config, write_tiny_clip_tokenizer

UNET = {"down_block_types": ["CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2}


def write_clip_folder(folder: Path, seed: int = 7) -> Path:
    """A ``CLIPModel.save_pretrained`` folder with the tiny text tower and the char tokenizer (as the foundation's)."""
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config=tiny_clip_text_config().to_dict(),
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    write_tiny_clip_tokenizer(folder / "tok")
    CLIPTokenizer.from_pretrained(str(folder / "tok")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_folder(tmp_path_factory.mktemp("clip") / "export")


def test_text_encoder_is_the_clip_folders_text_tower(clip_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every tensor equals ``CLIPTextModel.from_pretrained(folder)``'s; encodings and the null condition follow."""
    generator = EditGenerator(preset="tiny", image_embed_dim=0, unet_config=UNET, text_encoder=str(clip_folder))
    assert "generation" not in pending_parts(generator) and list(pending_parts(generator)) == [""]
    with caplog.at_level(logging.INFO, logger=LOADS_LOGGER):
        assert load_pretrained(generator) == [""]
    reference = CLIPTextModel.from_pretrained(str(clip_folder)).eval()
    loaded = generator.text_encoder.model.state_dict()
    expected = reference.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_folder))
    ids = tokenizer(["add a red square", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = reference(ids).last_hidden_state
    assert torch.equal(generator.encode_text(["add a red square", ""]), want)
    assert torch.equal(generator.null_f_txt, want[1:])  # the null condition is re-encoded with the loaded tower
    assert not any(p.requires_grad for p in generator.text_encoder.parameters())
    assert [r.getMessage() for r in caplog.records if r.name == LOADS_LOGGER] == [
        f"generation.text_encoder: loaded {len(expected)} tensors from {clip_folder} "
        "(the CLIP text tower and its tokenizer)"
    ]
    assert load_pretrained(generator) == []  # loaded once


def test_text_encoder_folder_over_the_checkpoints(clip_folder: Path, tmp_path: Path) -> None:
    """With ``pretrained`` (a checkpoint) too, the UNet comes from it and the text encoder from the folder."""
    source = EditGenerator(preset="tiny", image_embed_dim=0, unet_config=UNET)
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "g.ckpt")
    generator = EditGenerator(
        preset="tiny", image_embed_dim=0, unet_config=UNET, pretrained=str(tmp_path / "g.ckpt"),
        text_encoder=str(clip_folder),
    )  # fmt: skip
    generator.load_pretrained()
    assert all(torch.equal(a, b) for a, b in zip(generator.unet.parameters(), source.unet.parameters(), strict=True))
    reference = CLIPTextModel.from_pretrained(str(clip_folder)).state_dict()
    assert all(torch.equal(generator.text_encoder.model.state_dict()[k], v) for k, v in reference.items())
    key = "embeddings.token_embedding.weight"
    assert not torch.equal(source.text_encoder.model.state_dict()[key], reference[key])  # not the preset's tower


def test_missing_clip_folder_is_one_line(tmp_path: Path) -> None:
    """A missing folder: built with the preset's shapes, then one line naming it and ``insightedit foundations``."""
    missing = tmp_path / "foundations" / "clip" / "export"
    generator = EditGenerator(preset="tiny", image_embed_dim=0, unet_config=UNET, text_encoder=str(missing))
    with pytest.raises(UserError) as error:
        generator.load_pretrained()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"generation.text_encoder: {missing} is not a CLIP folder")
    assert "`insightedit foundations`" in message


def test_missing_foundation_checkpoint_is_one_line(tmp_path: Path) -> None:
    """``generation.pretrained`` naming an absent foundation checkpoint says how to build it."""
    missing = tmp_path / "foundations" / "instruct_pix2pix" / "last.ckpt"
    generator = EditGenerator(preset="tiny", image_embed_dim=0, unet_config=UNET, pretrained=str(missing))
    with pytest.raises(UserError, match=r"checkpoint .*last\.ckpt not found; .*`insightedit foundations`$"):
        generator.load_pretrained()


def test_saved_generator_keeps_the_folders_text_encoder(clip_folder: Path, tmp_path: Path) -> None:
    """``save_pretrained`` folders carry the text encoder; loading one needs no CLIP folder any more."""
    generator = EditGenerator(preset="tiny", image_embed_dim=0, unet_config=UNET, text_encoder=str(clip_folder))
    generator.load_pretrained()
    generator.save_pretrained(tmp_path / "saved")
    moved = tmp_path / "moved"
    clip_folder.rename(moved)  # the CLIP folder is gone
    try:
        again = EditGenerator.from_pretrained(tmp_path / "saved")
    finally:
        moved.rename(clip_folder)
    expected = generator.text_encoder.model.state_dict()
    assert all(torch.equal(again.text_encoder.model.state_dict()[k], v) for k, v in expected.items())
    assert torch.equal(again.null_f_txt, generator.null_f_txt)
