"""``insightedit data build`` through the real code paths: tiny random Grounding DINO, SAM and SD inpainting
folders (built here, saved with ``save_pretrained``) and a loopback OpenAI-compatible server for the chat steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _chat_server import ChatServer, image_count, prompt_text
from PIL import Image

from insightedit.cli import main
from insightedit.data.build.oracle import render_photos
from insightedit.data.checking import check_dataset

WORDS = ["red", "blue", "circle", "square", "green", "triangle", "a", "the", "on", "background"]


def build_tiny_grounding_dino(folder: Path) -> Path:
    """A ~0.1M-parameter Grounding DINO (Swin 1-1-1-1 backbone, 1-layer BERT) and its processor."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        use_timm_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=10,
        num_feature_levels=3,
        encoder_n_points=1,
        decoder_n_points=1,
        max_text_len=32,
    )  # decoder_layers >= 2: its box heads tie weights across layers
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    images = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=images, tokenizer=BertTokenizer(str(vocab))).save_pretrained(folder)
    return folder


def build_tiny_sam(folder: Path) -> Path:
    """A ~25k-parameter SAM working at 64 px and its processor."""
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(
        hidden_size=16,
        output_channels=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        mlp_dim=32,
        global_attn_indexes=[0],
        window_size=0,
        num_pos_feats=8,
    )
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
    )
    config = SamConfig(
        vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(), mask_decoder_config=decoder.to_dict()
    )
    SamModel(config).save_pretrained(folder)
    images = SamImageProcessor(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    SamProcessor(image_processor=images).save_pretrained(folder)
    return folder


def build_tiny_inpainting(folder: Path) -> Path:
    """A StableDiffusionInpaintPipeline with a 9-channel (8, 16) UNet, a 1-block VAE and a tiny CLIP text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from insightedit.models.text_encoder import tiny_clip_text_config, tiny_clip_tokenizer

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=9,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(tiny_clip_text_config(hidden_size=16)),
        tokenizer=tiny_clip_tokenizer(folder / "tokenizer-source"),
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


CAPTION = {
    "caption": "a red circle and a blue square on a grey background",
    "objects": [
        {"category": "shape", "name": "Red circle", "detailed_caption": "a red circle on the left"},
        {"category": "shape", "name": "blue square", "detailed_caption": "a blue square"},
    ],
}


def respond(body: dict, number: int) -> tuple[int, str]:
    """Canned replies by prompt: caption (fenced), replacement, rewrite (prose first time), SC and PQ scores."""
    text = prompt_text(body)
    if "building an image-editing dataset" in text:
        return 200, "```json\n" + json.dumps(CAPTION) + "\n```"
    if "take its place" in text:
        return 200, json.dumps({"name": "green triangle", "detailed_caption": "a green triangle"})
    if "Rewrite an image-editing instruction" in text:
        if "could not be read" not in text and "remove the red circle" in text:
            return 200, "Sure, here is a better instruction."  # unusable: asked again with a format reminder
        return 200, json.dumps({"simple": "Please edit it.", "reasoning": "Change the thing that looks like a ball."})
    if "INSTRUCTION:" in text:
        return 200, json.dumps({"score": [8, 7], "reasoning": "fine"})
    return 200, json.dumps({"score": [9, 6], "reasoning": "ok"})


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, more makes these tiny models ~10x slower (spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    return {
        "dino": build_tiny_grounding_dino(root / "grounding-dino"),
        "sam": build_tiny_sam(root / "sam"),
        "inpaint": build_tiny_inpainting(root / "inpainting"),
    }


def test_tiny_models_and_a_chat_server_build_checked_records(folders, tmp_path, capsys):
    server = ChatServer(respond, delay_s=0.01)
    try:
        chat = {
            "backend": "openai",
            "base_url": server.url,
            "model": "tiny",
            "api_key_env": "BUILD_TEST_KEY",
            "concurrency": 2,
            "retries": 1,
            "timeout_s": 30,
        }
        config = {
            "trainer": {"accelerator": "cpu", "devices": 1},
            "steps": {
                "caption": {**chat, "max_objects": 4},
                "segment": {
                    "backend": "grounded_sam",
                    "grounding_dino": str(folders["dino"]),
                    "sam": str(folders["sam"]),
                    "box_threshold": 0.0,
                    "text_threshold": 0.0,
                },
                "inpaint": {
                    "backend": "diffusers",
                    "model": str(folders["inpaint"]),
                    "resolution": 32,
                    "num_inference_steps": 2,
                    "guidance_scale": 1.0,
                    "mask_dilation": 1,
                    "chat": chat,
                },
                "rewrite": chat,
                "filter": {**chat, "threshold": 0.6},
            },
        }
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(config))
        photos, out = tmp_path / "photos", tmp_path / "out"
        render_photos(photos, 3, size=32, seed=1)
        for sidecar in photos.glob("*.scene.json"):
            sidecar.unlink()  # real backends need no scene
        code = main(["data", "build", "--config", str(path), "--images", str(photos), "--out", str(out)])
        printed = capsys.readouterr().out
        assert code == 0, printed
    finally:
        server.close()
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["done"] == 3 for s in summary["steps"].values()), summary
    report = check_dataset(out)
    assert report.bad == [] and len(report.good) == summary["records"]["total"] > 0
    # every record of every image passed: O/10 = sqrt(min(8, 7) * min(9, 6)) / 10 = 0.648 >= 0.6
    assert summary["filter"]["passed"] == summary["filter"]["scored"] == summary["records"]["total"]
    for record in report.good:
        assert record.reasoning_instructions == ["Change the thing that looks like a ball."]
        assert record.instructions[-1] == "Please edit it."
        assert record.extra["viescore"]["overall/10"] == pytest.approx(0.648, abs=1e-3)
        assert record.class_origin in ("red circle", "blue square", "green triangle", "")
        source = np.asarray(Image.open(record.source_path))
        target = np.asarray(Image.open(record.target_path))
        mask = record.mask()
        assert mask.shape == source.shape[:2] == (32, 32)
        assert np.array_equal(source[~mask], target[~mask])  # inpainting is pasted inside the mask only
    captions = [r for r in server.requests if "building an image-editing dataset" in prompt_text(r)]
    judged = [r for r in server.requests if "INSTRUCTION:" in prompt_text(r)]
    assert len(captions) == 3 and all(image_count(r) == 1 for r in captions)
    assert len(judged) == summary["filter"]["scored"] and all(image_count(r) == 2 for r in judged)
    assert any("could not be read" in prompt_text(r) for r in server.requests)  # the prose reply was re-asked
    assert server.max_in_flight <= 2
    masks = json.loads(next((out / "2_mask_generation").glob("*.json")).read_text())
    assert masks["box_format"] == "xyxy" and masks["annotations"][0]["class_name"] == "red circle"


def build_tiny_causal_lm(folder: Path) -> Path:
    """A 1-layer Llama with a word-level tokenizer and a plain chat template (it answers gibberish)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "{": 3, "}": 4, '"': 5, ":": 6, **{w: i + 7 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_local_transformers_rewriter_runs_and_its_unreadable_replies_are_recorded(tmp_path, capsys):
    lm = build_tiny_causal_lm(tmp_path / "lm")
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1},
        "steps": {"rewrite": {"backend": "transformers", "path": str(lm), "max_new_tokens": 4, "parse_retries": 1}},
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    photos, out = tmp_path / "photos", tmp_path / "out"
    render_photos(photos, 1, size=32, seed=0)
    code = main(["data", "build", "--config", str(path), "--images", str(photos), "--out", str(out), "--steps", "1-4"])
    printed = capsys.readouterr().out
    assert code == 1, printed
    failure = json.loads((out / "failures" / "4_rewrite" / "000000.json").read_text())
    assert failure["reason"].startswith("unparseable reply after 2 attempts"), failure
    assert "records: 0 unfiltered" in printed
    cached = sorted((out / ".build" / "cache").rglob("*.json"))
    assert cached and json.loads(cached[0].read_text())["judge"] == f"transformers:{lm}"
    written = {path: path.stat().st_mtime_ns for path in cached}
    assert main(["data", "build", "--config", str(path), "--images", str(photos), "--out", str(out),
                 "--steps", "1-4", "--retry-failed"]) == 1  # fmt: skip
    assert json.loads((out / "failures" / "4_rewrite" / "000000.json").read_text())["attempts"] == 2
    assert any(p.stat().st_mtime_ns != t for p, t in written.items())  # unusable cached replies were asked again


def test_a_model_folder_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    (tmp_path / "dino").mkdir()
    (tmp_path / "sam").mkdir()
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "steps": {
                    "segment": {
                        "backend": "grounded_sam",
                        "grounding_dino": str(tmp_path / "dino"),
                        "sam": str(tmp_path / "sam"),
                    }
                }
            }
        )
    )
    render_photos(tmp_path / "photos", 1, size=32)
    argv = ["--config", str(config), "--images", str(tmp_path / "photos"), "--out", str(tmp_path / "out")]
    assert main(["data", "build", *argv, "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot load Grounding DINO from '{tmp_path / 'dino'}'")
