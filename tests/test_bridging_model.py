"""The bridging model's contract, its losses, its presets and its LightningModule (CPU, offline)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from insightedit.models.bridging import BridgeOutput, BridgingModel, build_bridging
from insightedit.systems.bridging import BridgingModule

B, R = 2, 8
# clip: the tiny CLIP foundation's image tower + projection (TINY_CLIP_CONFIG)
TINY_COUNTS = {"qformer": 54_320, "bim": 120_960, "mapper": 6_368, "clip": 76_544}  # clip: 4-px patches, 8x8 grid
FULL_COUNTS = {"qformer": 65_015_040, "bim": 30_262_848, "mapper": 9_972_480, "clip": 303_966_208}


@pytest.fixture
def model() -> BridgingModel:
    torch.manual_seed(0)
    return build_bridging("tiny").eval()


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "h": torch.randn(B, R, 64, generator=generator),
        "vision_features": torch.randn(B, 16, 48, generator=generator),
        "clip_target": torch.randn(B, 3, 32, 32, generator=generator),
        "caption_embeds": torch.randn(B, 77, 32, generator=generator),
    }


def test_forward_contract_and_fresh_bim(model: BridgingModel) -> None:
    x = inputs()
    out = model(x["h"], x["vision_features"], (4, 4), (16, 16))
    assert isinstance(out, BridgeOutput)
    assert out.q.shape == (B, 77, 32) and out.image_embeds.shape == (B, 32)
    assert torch.equal(out.f_txt, out.q)  # fresh BIM: zero heads
    assert out.v_txt is not None and out.v_txt.shape == (B, 64, 16, 16)
    assert torch.equal(out.v_txt, torch.zeros_like(out.v_txt))
    model.use_bim = False
    off = model(x["h"], None, (4, 4), (16, 16))
    assert off.v_txt is None and off.f_txt is off.q
    torch.testing.assert_close(off.q, out.q)
    model.use_bim = True
    with pytest.raises(ValueError, match="vision_features"):
        model(x["h"], None, (4, 4), (16, 16))


def test_mm_mask_reaches_qformer_and_mapper(model: BridgingModel) -> None:
    x = inputs()
    mask = torch.ones(B, R, dtype=torch.long)
    mask[:, 5:] = 0
    changed = x["h"].clone()
    changed[:, 5:] = 5.0 * torch.randn(B, R - 5, 64)
    a = model(x["h"], x["vision_features"], (4, 4), (8, 8), mm_mask=mask)
    b = model(changed, x["vision_features"], (4, 4), (8, 8), mm_mask=mask)
    torch.testing.assert_close(a.q, b.q, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, rtol=0, atol=1e-6)
    c = model(changed, x["vision_features"], (4, 4), (8, 8))
    assert (c.q - a.q).abs().max() > 1e-3 and (c.image_embeds - a.image_embeds).abs().max() > 1e-3


def test_iaa_loss_is_mse_to_frozen_clip(model: BridgingModel) -> None:
    model.train()
    x = inputs()
    clip = model.clip_image_encoder
    assert clip is not None and not clip.training  # model.train() leaves CLIP in eval mode
    clip_before = {k: v.clone() for k, v in clip.state_dict().items()}
    out = model(x["h"], x["vision_features"], (4, 4), (8, 8))
    loss = model.iaa_loss(out.image_embeds, x["clip_target"])
    expected = F.mse_loss(out.image_embeds, clip.encode_image(x["clip_target"]))
    torch.testing.assert_close(loss, expected)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    assert all(p.grad is not None for p in model.mapper.parameters())
    params = [p for group in model.parameter_groups().values() for p in group]
    torch.optim.AdamW(params, lr=1e-2).step()
    assert all(torch.equal(clip.state_dict()[k], v) for k, v in clip_before.items())
    with pytest.raises(ValueError, match="CLIP target"):
        model.iaa_loss(out.image_embeds[:, :16], x["clip_target"])


def test_alignment_loss_is_direct_mse(model: BridgingModel) -> None:
    x = inputs()
    q = model(x["h"], x["vision_features"], (4, 4), (8, 8)).q
    torch.testing.assert_close(model.alignment_loss(q, x["caption_embeds"]), ((q - x["caption_embeds"]) ** 2).mean())
    with pytest.raises(ValueError, match="caption_embeds"):
        model.alignment_loss(q, x["caption_embeds"][:, :10])


def test_parameter_groups_by_name_and_count(model: BridgingModel) -> None:
    groups = model.parameter_groups()
    assert set(groups) == {"qformer", "bim", "mapper"}
    ids = {name: {id(p) for p in params} for name, params in groups.items()}
    for name, param in model.named_parameters():
        component = name.split(".")[0]
        if component == "clip_image_encoder":
            assert not any(id(param) in group for group in ids.values()), name
        else:
            assert id(param) in ids[component], name
    assert sum(len(g) for g in ids.values()) == sum(len(g) for g in groups.values())  # no duplicates
    assert model.num_parameters() == TINY_COUNTS


def test_full_preset_builds_on_meta() -> None:
    model = build_bridging("full", device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert model.num_parameters() == FULL_COUNTS
    assert model.qformer.cross_attention_layers == [0, 2, 4]
    assert model.qformer.query_tokens.shape == (1, 77, 768)
    config = model.bim.config
    assert (config.hidden_size, config.num_hidden_layers, config.mlp_dim, config.num_attention_heads) == (
        1024,
        2,
        2048,
        8,
    )
    assert config.attention_downsample_rate == 2
    out = model(
        torch.empty(B, 32, 4096, device="meta"), torch.empty(B, 577, 1024, device="meta"), (24, 24), (64, 64)
    )  # LLaVA-1.5's 24x24 patches with CLS
    assert out.f_txt.shape == (B, 77, 768) and out.image_embeds.shape == (B, 768)
    assert out.v_txt is not None and out.v_txt.shape == (B, 320, 64, 64)


def test_size_overrides() -> None:
    model = build_bridging("tiny", d_llm=96, d_vision=40, text_dim=48, unet_in_width=32, clip_dim=16, use_bim=False)
    out = model(torch.randn(1, 4, 96), None, (2, 2), (4, 4))
    assert out.q.shape == (1, 77, 48) and out.image_embeds.shape == (1, 16) and not model.use_bim
    assert model.clip_image_encoder is not None and model.clip_image_encoder.embed_dim == 16
    with pytest.raises(ValueError, match="preset"):
        build_bridging("huge")


def test_bridging_module_trains_both_losses_down() -> None:
    torch.manual_seed(0)
    module = BridgingModule(preset="tiny", learning_rate=3e-3, group_learning_rates={"mapper": 1e-2})
    batch = inputs(seed=1)
    bim_before = {k: v.clone() for k, v in module.model.bim.state_dict().items()}
    clip_before = {k: v.clone() for k, v in module.model.clip_image_encoder.state_dict().items()}
    with torch.no_grad():
        before = module.compute_losses(batch)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=25,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader([batch] * 25, batch_size=None))
    module.eval()
    with torch.no_grad():
        after = module.compute_losses(batch)
    assert after["loss_iaa"] < 0.5 * before["loss_iaa"]
    assert after["loss_align"] < 0.9 * before["loss_align"]
    assert {"train/loss_iaa", "train/loss_align", "train/loss"} <= set(trainer.callback_metrics)
    optimizer = trainer.optimizers[0]
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("qformer", 3e-3), ("mapper", 1e-2)]
    assert all(torch.equal(module.model.bim.state_dict()[k], v) for k, v in bim_before.items())
    assert all(torch.equal(module.model.clip_image_encoder.state_dict()[k], v) for k, v in clip_before.items())
