"""EditUNet against diffusers' UNet: widening, λ = 0, v_txt, decoupled attention and save/load."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from insightedit.models.generation.edit_unet import IMAGE_BRANCH_WEIGHTS, EditUNet

BASE_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=8,
    norm_num_groups=8,
)


def base_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**BASE_CONFIG)
    # diffusers zero-initialises some output layers; give every weight a value so comparisons mean something
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return unet


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, 4, 8, 8, generator=g)
    source = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([3, 700][:batch])
    f_txt = torch.randn(batch, 7, 24, generator=g)
    image_embeds = torch.randn(batch, 16, generator=g)
    return noisy, source, t, f_txt, image_embeds


def test_conv_in_is_widened_with_zero_weights_and_source_is_ignored_when_fresh():
    reference = base_unet()
    model = EditUNet(copy.deepcopy(reference), image_embed_dim=None)
    assert model.unet.config.in_channels == 8 and model.unet.conv_in.in_channels == 8
    assert torch.equal(model.unet.conv_in.weight[:, :4], reference.conv_in.weight)
    assert torch.count_nonzero(model.unet.conv_in.weight[:, 4:]) == 0
    noisy, source, t, f_txt, _ = inputs()
    with torch.no_grad():
        ours = model(noisy, source, t, f_txt)
        text_to_image = reference(noisy, t, encoder_hidden_states=f_txt).sample
    torch.testing.assert_close(ours, text_to_image, rtol=0, atol=1e-6)


def test_fresh_module_matches_diffusers_unet_with_same_8_channel_weights():
    model = EditUNet(base_unet(), image_embed_dim=16, image_scale=0.0)
    with torch.no_grad():  # a trained 8-channel input: the source latent now matters
        model.unet.conv_in.weight[:, 4:].normal_(0, 0.05)
    reference = UNet2DConditionModel(**{**BASE_CONFIG, "in_channels": 8})
    text_only = {k: v for k, v in model.unet.state_dict().items() if ".processor." not in k}
    reference.load_state_dict(text_only)
    noisy, source, t, f_txt, image_embeds = inputs()
    with torch.no_grad():
        ours = model(noisy, source, t, f_txt, image_embeds=image_embeds, v_txt=torch.zeros(2, 32, 8, 8))
        theirs = reference(torch.cat([noisy, source], 1), t, encoder_hidden_states=f_txt).sample
    assert torch.equal(ours, theirs)


def test_lambda_zero_is_bit_identical_to_the_unet_without_image_branch_and_lambda_matters():
    unet = base_unet()
    plain = EditUNet(copy.deepcopy(unet), image_embed_dim=None)
    with_branch = EditUNet(copy.deepcopy(unet), image_embed_dim=16, image_scale=0.0)
    noisy, source, t, f_txt, image_embeds = inputs()
    with torch.no_grad():
        expected = plain(noisy, source, t, f_txt)
        assert torch.equal(with_branch(noisy, source, t, f_txt, image_embeds=image_embeds), expected)
        with_branch.image_scale = 0.7
        changed = with_branch(noisy, source, t, f_txt, image_embeds=image_embeds)
    assert (changed - expected).abs().max() > 1e-3


def test_v_txt_is_added_to_conv_in_output():
    model = EditUNet(base_unet(), image_embed_dim=None)
    noisy, source, t, f_txt, _ = inputs()
    v_txt = torch.randn(2, 32, 8, 8)
    reference = copy.deepcopy(model.unet)
    conv_in = reference.conv_in

    class ConvPlusV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_in

        def forward(self, x):
            return self.conv(x) + v_txt

    reference.conv_in = ConvPlusV()
    with torch.no_grad():
        ours = model(noisy, source, t, f_txt, v_txt=v_txt)
        theirs = reference(torch.cat([noisy, source], 1), t, encoder_hidden_states=f_txt).sample
        without = model(noisy, source, t, f_txt)
    assert torch.equal(ours, theirs)
    assert (ours - without).abs().max() > 1e-3
    # the hook leaves no state behind: the next call without v_txt is the plain UNet again
    with torch.no_grad():
        assert torch.equal(model(noisy, source, t, f_txt), without)


def test_image_keys_and_values_start_from_the_text_ones():
    model = EditUNet(base_unet(), image_embed_dim=16)
    modules = dict(model.unet.named_modules())
    processors = model.image_processors()
    assert len(processors) == 7  # cross-attention layers: 2 down (1 each) + 1 mid + 4 up (2 each)
    for name, processor in processors.items():
        attention = modules[name.removesuffix(".processor")]
        assert torch.equal(processor.to_k_ip[0].weight, attention.to_k.weight)
        assert torch.equal(processor.to_v_ip[0].weight, attention.to_v.weight)
        assert processor.to_k_ip[0].bias is None


def test_save_load_round_trip_is_exact_including_the_image_branch(tmp_path):
    model = EditUNet(base_unet(), image_embed_dim=16, image_scale=0.6)
    with torch.no_grad():
        for parameter in model.image_branch_parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))  # as if trained: differs from to_k/to_v
    model.save_pretrained(tmp_path)
    loaded = EditUNet.from_pretrained(tmp_path)
    assert loaded.image_scale == pytest.approx(0.6)
    noisy, source, t, f_txt, image_embeds = inputs()
    with torch.no_grad():
        assert torch.equal(
            model(noisy, source, t, f_txt, image_embeds=image_embeds),
            loaded(noisy, source, t, f_txt, image_embeds=image_embeds),
        )
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # the unet/ folder is a plain diffusers UNet any pipeline can read
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert plain.config.in_channels == 8 and not any(".processor." in k for k in plain.state_dict())


def test_loading_without_or_with_partial_image_branch_fails_loudly(tmp_path):
    model = EditUNet(base_unet(), image_embed_dim=16)
    model.save_pretrained(tmp_path)
    weights = tmp_path / IMAGE_BRANCH_WEIGHTS
    state = load_file(str(weights))
    dropped = sorted(k for k in state if k.startswith("ip_adapter."))[0]
    del state[dropped]
    save_file(state, str(weights))
    with pytest.raises(RuntimeError, match="missing"):
        EditUNet.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="image branch"):
        EditUNet.from_pretrained(tmp_path)


def test_saved_image_branch_loads_into_diffusers_own_ip_adapter_loader(tmp_path):
    """Our ip_adapter.safetensors is diffusers' IP-Adapter layout: its loader rebuilds the same UNet."""
    model = EditUNet(base_unet(), image_embed_dim=16, num_image_tokens=4, image_scale=1.0)
    with torch.no_grad():
        for parameter in model.image_branch_parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    flat = load_file(str(tmp_path / IMAGE_BRANCH_WEIGHTS))
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, rest = key.split(".", 1)
        nested[group][rest] = value
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    theirs._load_ip_adapter_weights([nested])
    noisy, source, t, f_txt, image_embeds = inputs()
    with torch.no_grad():
        ours = model(noisy, source, t, f_txt, image_embeds=image_embeds)
        reference = theirs(
            torch.cat([noisy, source], 1), t, encoder_hidden_states=f_txt,
            added_cond_kwargs={"image_embeds": [image_embeds[:, None]]},
        ).sample
    assert torch.equal(ours, reference)
