"""EditPipeline (InsightEdit): seeds, aspect ratios, batches, samplers, precision, and InstructPix2Pix equivalence."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from PIL import Image

from insightedit.pipeline import SCHEDULERS, EditPipeline
from insightedit.pipeline.images import working_size
from insightedit.pipeline.settings import make_scheduler
from insightedit.systems.editor_system import EditorSystem

INSTRUCTIONS = ["remove the red circle", "add a blue square"]


def perturb(system: EditorSystem, scale: float = 0.05) -> None:
    """Move the zero-initialised parts (BIM heads, image branch, source channels) off zero, like training."""
    g = torch.Generator().manual_seed(1)
    editor = system.editor
    with torch.no_grad():
        for parameter in list(editor.bridging.bim.parameters()) + list(
            editor.generation.unet.image_branch_parameters()
        ):
            parameter.add_(scale * torch.randn(parameter.shape, generator=g))
        conv_in = editor.generation.unet.unet.conv_in.weight
        half = conv_in.shape[1] // 2
        conv_in[:, half:].normal_(0, 0.1, generator=g)


@pytest.fixture(scope="module")
def pipe() -> EditPipeline:
    torch.manual_seed(0)
    system = EditorSystem(member="insightedit", preset="tiny", stage=3).eval()
    perturb(system)
    return EditPipeline.from_system(system, resolution=32)


@pytest.fixture(scope="module")
def vae_system() -> EditorSystem:
    """A tiny InsightEdit whose UNet works in a 4-channel VAE latent, so diffusers' pipeline can drive it."""
    torch.manual_seed(0)
    unet = {"block_out_channels": (32, 64), "norm_num_groups": 8, "in_channels": 4, "out_channels": 4}
    system = EditorSystem(
        member="insightedit", preset="tiny", stage=2, generation={"latent": "vae", "unet_config": unet}
    )
    system.eval()
    perturb(system)
    return system


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_same_seed_gives_the_same_image_and_another_seed_another(pipe):
    image = random_image(32, 32, 0)
    kwargs = dict(num_inference_steps=4, text_guidance=3.0)
    a = pipe(image, INSTRUCTIONS[0], seed=5, **kwargs).images[0]
    b = pipe(image, INSTRUCTIONS[0], generator=torch.Generator().manual_seed(5), **kwargs).images[0]
    c = pipe(image, INSTRUCTIONS[0], seed=6, **kwargs).images[0]
    assert np.array_equal(as_array(a), as_array(b))
    assert np.abs(as_array(a) - as_array(c)).max() > 10
    # the instruction is read: another instruction, same seed, another image
    d = pipe(image, INSTRUCTIONS[1], seed=5, **kwargs).images[0]
    assert np.abs(as_array(a) - as_array(d)).max() > 0


@pytest.mark.parametrize("size", [(20, 52), (45, 70), (64, 16)])
def test_any_aspect_ratio_comes_back_at_the_source_size(pipe, size):
    height, width = size
    out = pipe(random_image(height, width, 1), INSTRUCTIONS[0], num_inference_steps=2, seed=0)
    assert out.images[0].size == (width, height)
    h, w = working_size(height, width, pipe.size_multiple, 32)
    assert h % pipe.size_multiple == 0 and w % pipe.size_multiple == 0
    assert abs(h / w - height / width) < 0.5 * height / width  # about the source's aspect


def test_a_batch_equals_the_edits_one_by_one(pipe):
    images = [random_image(32, 32, 2), random_image(24, 40, 3), random_image(32, 32, 4)]
    seeds = [11, 12, 13]
    batch = pipe(
        images,
        INSTRUCTIONS + INSTRUCTIONS[:1],
        num_inference_steps=3,
        output_type="pt",
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images
    for image, instruction, seed, batched in zip(images, INSTRUCTIONS + INSTRUCTIONS[:1], seeds, batch, strict=True):
        alone = pipe(image, instruction, num_inference_steps=3, output_type="pt", seed=seed).images[0]
        assert alone.shape == batched.shape
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)


def test_image_scale_changes_the_edit_and_is_restored(pipe):
    image = random_image(32, 32, 5)
    before = pipe.generation.unet.image_scale
    zero = pipe(image, INSTRUCTIONS[0], image_scale=0.0, seed=1, num_inference_steps=3, output_type="pt").images[0]
    two = pipe(image, INSTRUCTIONS[0], image_scale=2.0, seed=1, num_inference_steps=3, output_type="pt").images[0]
    assert (zero - two).abs().max() > 1e-3
    assert pipe.generation.unet.image_scale == before


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_lambda_zero_reduces_to_diffusers_instruct_pix2pix(vae_system, scheduler):
    """λ = 0 and no BIM: the edit is InstructPix2Pix's dual guidance on f_txt, step for step."""
    pipe = EditPipeline.from_system(vae_system)
    g = torch.Generator().manual_seed(3)
    source = torch.rand(2, 3, 32, 32, generator=g)  # [0, 1], as diffusers takes tensors
    steps, s_t, s_i = 5, 5.0, 1.5
    ours = pipe(
        source,
        INSTRUCTIONS,
        image_scale=0.0,
        text_guidance=s_t,
        image_guidance=s_i,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(7),
        scheduler=scheduler,
        output_type="pt",
    ).images
    conditions = pipe.conditions(list(source), INSTRUCTIONS, (4, 4))
    assert conditions.v_txt is None  # stage 2: no BIM
    generation = vae_system.editor.generation
    with generation.unet._text_only() as unet:  # diffusers' pipeline knows no image branch
        theirs = StableDiffusionInstructPix2PixPipeline(
            vae=generation.latent_space.vae,
            text_encoder=generation.text_encoder.model,
            tokenizer=generation.text_encoder.tokenizer,
            unet=unet,
            scheduler=make_scheduler(pipe.base_scheduler(), scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        theirs.set_progress_bar_config(disable=True)
        expected = theirs(
            prompt_embeds=conditions.f_txt,
            negative_prompt_embeds=generation.null_f_txt.expand(2, -1, -1),
            image=source,
            num_inference_steps=steps,
            guidance_scale=s_t,
            image_guidance_scale=s_i,
            generator=torch.Generator().manual_seed(7),
            output_type="pt",
        ).images
    torch.testing.assert_close(torch.stack(ours), expected, atol=1e-5, rtol=0)
    # and the image branch is really there: λ = 1 gives another edit
    with_image = pipe(
        source,
        INSTRUCTIONS,
        image_scale=1.0,
        text_guidance=s_t,
        image_guidance=s_i,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(7),
        scheduler=scheduler,
        output_type="pt",
    ).images
    assert (torch.stack(with_image) - expected).abs().max() > 1e-3


def test_bfloat16_edits_close_to_float32(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "model")
    image = random_image(32, 32, 6)
    kwargs = dict(seed=2, num_inference_steps=3, text_guidance=3.0, output_type="pt")
    full = EditPipeline.from_pretrained(tmp_path / "model", device="cpu", dtype="float32")
    half = EditPipeline.from_pretrained(tmp_path / "model", device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and next(half.mllm.parameters()).dtype == torch.bfloat16
    a = full(image, INSTRUCTIONS[0], **kwargs).images[0]
    b = half(image, INSTRUCTIONS[0], **kwargs).images[0]
    assert torch.isfinite(b).all()
    assert (a - b).abs().mean() < 0.05


def test_4bit_mllm_loads_and_edits(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "model")
    quantized = EditPipeline.from_pretrained(tmp_path / "model", device="cpu", quantization="4bit")
    assert getattr(quantized.mllm.base_model, "is_loaded_in_4bit", False)
    out = quantized(random_image(24, 36, 7), INSTRUCTIONS[0], seed=0, num_inference_steps=2)
    assert out.images[0].size == (36, 24)
    assert set(out.timings) == {"understand", "generate", "total"}


def test_edit_command_8bit_loads_the_mllm_in_llm_int8_and_edits(tmp_path, pipe, capsys):
    """``insightedit edit --8bit`` on the tiny twin: bitsandbytes' CPU backend runs LLM.int8."""
    import bitsandbytes as bnb

    from insightedit.cli import main

    folder = pipe.save_pretrained(tmp_path / "model")
    loaded = EditPipeline.from_pretrained(folder, device="cpu", quantization="8bit")
    assert getattr(loaded.mllm.base_model, "is_loaded_in_8bit", False)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in loaded.mllm.modules())
    random_image(24, 36, 7).save(tmp_path / "photo.png")
    common = ["edit", "--model", str(folder), "--image", str(tmp_path / "photo.png"), "--instruction",
              INSTRUCTIONS[0], "--steps", "2"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "edited.png"), "--8bit"]) == 0
    assert Image.open(tmp_path / "edited.png").size == (36, 24)
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "o.png"), "--8bit", "--memory", "sequential"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --memory sequential streams the 16-bit MLLM; with --8bit use --memory low"
    )
    assert main([*common, "--out", str(tmp_path / "o.png"), "--8bit", "--4bit"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_empty_instruction_and_mismatched_batches_are_refused(pipe):
    with pytest.raises(ValueError, match="non-empty"):
        pipe(random_image(32, 32, 0), "  ")
    with pytest.raises(ValueError, match="2 images but 3"):
        pipe([random_image(32, 32, 0)] * 2, ["a", "b", "c"])
