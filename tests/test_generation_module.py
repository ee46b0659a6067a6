"""GenerationModule and its EditGenerator (``.model``): against diffusers' InstructPix2Pix pipeline, what trains,
learning, presets, save and load."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

from insightedit.models.generation.generator import EditGenerator
from insightedit.models.generation.presets import build_generation_components
from insightedit.systems.generation import GenerationModule

SMALL_UNET = {"block_out_channels": (32, 64), "norm_num_groups": 8}


def vae_module(**kwargs) -> EditGenerator:
    """A tiny InstructPix2Pix: 4-channel latent from a tiny VAE, UNet widened to 8 inputs (the module's generator)."""
    torch.manual_seed(0)
    module = GenerationModule(
        preset="tiny", latent="vae", unet_config={**SMALL_UNET, "in_channels": 4, "out_channels": 4}, **kwargs
    )
    assert isinstance(module.model, EditGenerator)
    return module.model.eval()


def test_one_denoising_run_matches_diffusers_instruct_pix2pix_pipeline():
    module = vae_module(image_embed_dim=0)
    with torch.no_grad():  # make the source channels count, as in a trained InstructPix2Pix UNet
        module.unet.unet.conv_in.weight[:, 4:].normal_(0, 0.1)
    source = torch.rand(2, 3, 32, 32) * 2 - 1
    prompts = ["turn the red circle blue", "remove the square"]
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=module.latent_space.vae,
        text_encoder=module.text_encoder.model,
        tokenizer=module.text_encoder.tokenizer,
        unet=module.unet.unet,
        scheduler=DDIMScheduler.from_config(module.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=prompts,
        image=(source + 1) / 2,
        num_inference_steps=6,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images
    ours = module.edit(
        source,
        instructions=prompts,
        num_inference_steps=6,
        text_guidance=7.5,
        image_guidance=1.5,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close((ours + 1) / 2, theirs, rtol=0, atol=1e-5)
    # and the guidance really matters: another text guidance gives another image
    other = module.edit(
        source,
        instructions=prompts,
        num_inference_steps=6,
        text_guidance=1.0,
        image_guidance=1.5,
        generator=torch.Generator().manual_seed(7),
    )
    assert (other - ours).abs().max() > 1e-3


def _trained_names(module: EditGenerator, **batch_extra) -> set[str]:
    module.train()
    module.zero_grad()
    source = torch.rand(4, 3, 32, 32) * 2 - 1
    loss = module.diffusion_loss(source, source.flip(-1), module.encode_text(["a"] * 4), **batch_extra)
    loss.backward()
    return {name for name, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_only_the_image_branch_when_the_unet_is_frozen():
    module = vae_module(
        train_unet=False, train_image_branch=True, drop_text_prob=0, drop_both_prob=0, drop_source_prob=0
    )
    names = _trained_names(module, image_embeds=torch.randn(4, 32))
    expected = {
        "unet.image_projection.image_embeds.weight",
        "unet.image_projection.image_embeds.bias",
        "unet.image_projection.norm.weight",
        "unet.image_projection.norm.bias",
    }
    expected |= {n for n, _ in module.named_parameters() if ".to_k_ip." in n or ".to_v_ip." in n}
    assert names == expected
    # 4 image-projection tensors + to_k_ip and to_v_ip in each of the 4 cross-attention layers
    # of the tiny UNet (attention on the coarse level only: 1 down, 1 mid, 2 up)
    assert len(names) == 4 + 2 * 4
    count = sum(p.numel() for n, p in module.named_parameters() if n in names)
    assert count == sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_gradients_reach_the_whole_unet_and_nothing_frozen():
    module = vae_module(drop_text_prob=0, drop_both_prob=0, drop_source_prob=0)
    names = _trained_names(module, image_embeds=torch.randn(4, 32))
    unet_names = {n for n, _ in module.named_parameters() if n.startswith("unet.")}
    assert not any(n.startswith(("text_encoder.", "latent_space.")) for n in names)
    assert all(not p.requires_grad for n, p in module.named_parameters() if not n.startswith("unet."))
    # every UNet tensor receives a gradient (the zero-initialised extra conv_in channels included)
    assert names == unet_names
    assert len(unet_names) > 100


def test_cfg_dropout_rates_match_instruct_pix2pix():
    module = GenerationModule(preset="tiny", unet_config=SMALL_UNET).model
    drop_text, drop_source = module._cfg_dropout(200_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    only_text = (drop_text & ~drop_source).float().mean().item()
    only_source = (drop_source & ~drop_text).float().mean().item()
    both = (drop_text & drop_source).float().mean().item()
    for rate in (only_text, only_source, both):
        assert rate == pytest.approx(0.05, abs=0.003)


def test_a_few_hundred_steps_on_a_fixed_batch_drive_the_loss_down():
    torch.manual_seed(0)
    module = GenerationModule(
        preset="tiny", learning_rate=2e-3, weight_decay=0.0, drop_text_prob=0, drop_both_prob=0, drop_source_prob=0
    )
    g = torch.Generator().manual_seed(0)
    source = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    target = source.clone()
    target[:, 0, 8:20, 8:20] = 1.0  # paint a red square
    generator = module.model
    f_txt = generator.encode_text(["paint a red square"] * 4)

    def held_loss() -> float:
        module.eval()
        with torch.no_grad():
            losses = [
                generator.diffusion_loss(source, target, f_txt, generator=torch.Generator().manual_seed(s))
                for s in range(8)
            ]
        module.train()
        return float(torch.stack(losses).mean())

    before = held_loss()
    optimizer = module.configure_optimizers()
    module.train()
    for _ in range(300):
        loss = generator.diffusion_loss(source, target, f_txt)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_loss()
    assert after < 0.5 * before, (before, after)


def test_full_preset_on_meta_has_instruct_pix2pix_unet_size():
    components = build_generation_components("full")
    unet = components.unet
    base = sum(p.numel() for n, p in unet.unet.named_parameters() if ".processor." not in n)
    added = sum(p.numel() for p in unet.image_branch_parameters())
    assert base == 859_532_484  # SD1.5's UNet with InstructPix2Pix's 8 input channels
    # 16 cross-attention layers x (to_k_ip + to_v_ip, 768 -> width, no bias) + ImageProjection(768 -> 4x768, LN)
    widths = 2 * 320 + 2 * 640 + 2 * 1280 + 1280 + 3 * 1280 + 3 * 640 + 3 * 320
    assert added == 2 * 768 * widths + (768 * 3072 + 3072 + 2 * 768)
    assert base + added == 881_065_668
    assert all(p.is_meta for p in unet.parameters())
    assert components.latent_space.channels == 4 and components.latent_space.downsample == 8


def test_module_save_and_load_round_trip_gives_the_same_edit(tmp_path):
    module = vae_module()
    with torch.no_grad():
        for parameter in module.unet.image_branch_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    module.save_pretrained(tmp_path)
    loaded = EditGenerator.from_pretrained(tmp_path).eval()
    source = torch.rand(1, 3, 32, 32) * 2 - 1
    kwargs = dict(instructions=["x"], image_embeds=torch.randn(1, 32), num_inference_steps=3)
    a = module.edit(source, generator=torch.Generator().manual_seed(0), **kwargs)
    b = loaded.edit(source, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(a, b)
    assert torch.equal(module.null_f_txt, loaded.null_f_txt)


def test_starts_from_a_text_only_lightning_checkpoint_with_the_image_branch_copied_from_it(tmp_path):
    """The tiny twin's stand-in for timbrooks/instruct-pix2pix: a GenerationModule .ckpt becomes ``pretrained``."""
    torch.manual_seed(3)
    text_only = GenerationModule(preset="tiny", image_embed_dim=0)
    with torch.no_grad():  # weights no fresh build could have
        for parameter in text_only.model.unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    path = tmp_path / "ip2p.ckpt"
    torch.save({"state_dict": text_only.state_dict()}, path)
    module = GenerationModule(preset="tiny", pretrained=str(path)).model
    source = dict(text_only.model.unet.unet.named_parameters())
    loaded = dict(module.unet.unet.named_parameters())
    assert set(source) <= set(loaded)
    for name, weight in source.items():
        assert torch.equal(loaded[name], weight), name
    processors = module.unet.image_processors()
    assert processors  # the image branch exists and starts from the loaded text projections
    for name, processor in processors.items():
        attention = module.unet.unet.get_submodule(name.rsplit(".processor", 1)[0])
        assert torch.equal(processor.to_k_ip[0].weight, attention.to_k.weight)
    with pytest.raises(ValueError, match="does not fit this UNet config"):
        config = {"down_block_types": ["CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2}
        GenerationModule(preset="tiny", pretrained=str(path), unet_config=config)
    with pytest.raises(FileNotFoundError):
        GenerationModule(preset="tiny", pretrained=str(tmp_path / "missing.ckpt"))
