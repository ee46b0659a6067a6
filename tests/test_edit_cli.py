"""``insightedit export`` and ``insightedit edit``: a checkpoint round trip, the folder, and every bad input."""

import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import PeftConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from insightedit.cli import main
from insightedit.pipeline import EditPipeline
from insightedit.systems.editor_system import EditorSystem


class OneBatch(Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return self.batch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny system trained one step (every trained part moves) and its Lightning checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)  # as LightningCLI's seed_everything: 0 before building the model
    system = EditorSystem(member="insightedit", preset="tiny", stage=3)
    g = torch.Generator().manual_seed(0)
    batch = {
        "source": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "target": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "mllm_source": torch.randn(2, 3, 32, 32, generator=g),
        "clip_target": torch.randn(2, 3, 32, 32, generator=g),
        "instruction": ["remove the red circle", "add a blue square"],
        "target_caption": ["a grey background", "a red circle and a blue square"],
    }
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(system, DataLoader(OneBatch(batch), batch_size=None))
    checkpoint = root / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    return system.eval(), checkpoint


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", "--ckpt_path", str(trained[1]), "--out", str(folder)]) == 0
    return folder


@pytest.fixture
def source_png(tmp_path):
    path = tmp_path / "source.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(path)
    return path


def test_export_writes_a_complete_folder(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert (index["_class_name"], index["format_version"], index["member"], index["preset"]) == (
        "EditPipeline", 2, "insightedit", "tiny",
    )  # fmt: skip
    assert index["options"] == {"align_target": "plain_instruction"}
    assert {name: entry["kind"] for name, entry in index["parts"].items()} == {
        "comprehension": "comprehension", "bridging": "bridging", "generation": "generation",
    }  # fmt: skip
    assert index["parts"]["comprehension"]["base_included"] is True
    assert (index["parts"]["bridging"]["bim"], index["parts"]["bridging"]["mapper"]) == (True, True)
    for name in (
        "comprehension/base/model.safetensors",
        "comprehension/base/config.json",
        "comprehension/tokenizer/tokenizer.json",
        "comprehension/adapter/adapter_model.safetensors",
        "comprehension/adapter/mm_embeddings.safetensors",
        "bridging/model.safetensors",
        "bridging/config.json",
        "generation/unet/diffusion_pytorch_model.safetensors",
        "generation/ip_adapter.safetensors",
        "generation/scheduler/scheduler_config.json",
        "generation/text_encoder/model.safetensors",
        "generation/generation_config.json",
    ):
        assert (exported / name).is_file(), name
    assert not list(exported.rglob("*.bin")) and not list(exported.rglob("*.ckpt"))
    assert PeftConfig.from_pretrained(str(exported / "comprehension/adapter")).peft_type == "LORA"
    unet = UNet2DConditionModel.from_pretrained(exported / "generation/unet")
    assert unet.config.in_channels == 2 * unet.config.out_channels


def test_exported_folder_edits_exactly_as_the_trained_system(trained, exported):
    system, _ = trained
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    kwargs = dict(seed=4, num_inference_steps=3, text_guidance=3.0, output_type="pt")
    expected = EditPipeline.from_system(system)(image, "remove the red circle", **kwargs).images[0]
    loaded = EditPipeline.from_pretrained(exported, device="cpu")
    got = loaded(image, "remove the red circle", **kwargs).images[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # the BIM's random Fourier features (a buffer checkpoints do not keep) came back as in training
    assert torch.equal(
        loaded.editor.bridging.bim.positional.positional_embedding,
        system.editor.bridging.bim.positional.positional_embedding,
    )


def test_edit_round_trip_gives_an_image_of_the_source_size(exported, source_png, tmp_path, capsys):
    def args(out):
        return [
            "edit",
            "--model",
            str(exported),
            "--image",
            str(source_png),
            "--instruction",
            "remove the red circle",
            "--out",
            str(out),
            "--steps",
            "3",
            "--seed",
            "1",
            "--lambda",
            "0.5",
            "--text-guidance",
            "4",
            "--image-guidance",
            "1.2",
            "--scheduler",
            "euler_a",
        ]

    out, again = tmp_path / "sub" / "edited.png", tmp_path / "again.png"
    assert main(args(out)) == 0
    assert Image.open(out).size == Image.open(source_png).size == (70, 45)
    assert "wrote" in capsys.readouterr().out
    assert main(args(again)) == 0  # the same seed gives the same file
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def _edit(model, image, out, instruction="remove the red circle", *extra):
    return main(
        [
            "edit",
            "--model",
            str(model),
            "--image",
            str(image),
            "--instruction",
            instruction,
            "--out",
            str(out),
            "--steps",
            "1",
            *extra,
        ]
    )


def test_missing_image(exported, tmp_path, capsys):
    assert _edit(exported, tmp_path / "nope.png", tmp_path / "o.png") == 2
    assert "not found" in _error_line(capsys)


def test_non_image_file(exported, tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture")
    assert _edit(exported, fake, tmp_path / "o.png") == 2
    assert "not an image" in _error_line(capsys)


def test_decompression_bomb(exported, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)  # 144 Mpx that compress to a few kB
    assert bomb.stat().st_size < 100_000
    assert _edit(exported, bomb, tmp_path / "o.png") == 2
    assert "too large to decode safely" in _error_line(capsys)
    assert not (tmp_path / "o.png").exists()


def test_images_above_a_chosen_pixel_limit(exported, source_png, tmp_path, capsys):
    assert _edit(exported, source_png, tmp_path / "o.png", "remove it", "--max-pixels", "1000") == 2
    assert "safe limit" in _error_line(capsys)


def test_empty_instruction(exported, source_png, tmp_path, capsys):
    assert _edit(exported, source_png, tmp_path / "o.png", "   ") == 2
    assert "instruction is empty" in _error_line(capsys)


def test_unwritable_output_name(exported, source_png, tmp_path, capsys):
    assert _edit(exported, source_png, tmp_path / "o.notanimage") == 2
    assert "cannot write" in _error_line(capsys)


def test_unreadable_model_folders(exported, source_png, tmp_path, capsys):
    assert _edit(tmp_path / "missing", source_png, tmp_path / "o.png") == 2
    assert "not found" in _error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _edit(empty, source_png, tmp_path / "o.png") == 2
    assert "not an exported InsightEdit model" in _error_line(capsys)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model_index.json").write_text("{not json")
    assert _edit(corrupt, source_png, tmp_path / "o.png") == 2
    assert "unreadable" in _error_line(capsys)
    partial = tmp_path / "partial"
    shutil.copytree(exported, partial)
    (partial / "bridging" / "model.safetensors").unlink()
    assert _edit(partial, source_png, tmp_path / "o.png") == 2
    assert "unreadable" in _error_line(capsys)


def test_export_bad_checkpoints(tmp_path, capsys):
    assert main(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "m")]) == 2
    assert "not found" in _error_line(capsys)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00garbage")
    assert main(["export", "--ckpt_path", str(junk), "--out", str(tmp_path / "m")]) == 2
    assert "not a readable checkpoint" in _error_line(capsys)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, other)
    assert main(["export", "--ckpt_path", str(other), "--out", str(tmp_path / "m")]) == 2
    assert "not an InsightEdit system checkpoint" in _error_line(capsys)
