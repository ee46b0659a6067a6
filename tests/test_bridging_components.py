"""Q-Former, BIM and IAA components of the bridging module (tiny sizes, CPU, offline)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from insightedit.errors import UserError
from insightedit.models.bridging import BidirectionalInteraction, Mapper, QFormerBridge, build_clip_image_encoder
from insightedit.models.bridging.presets import TINY_CLIP_CONFIG

B, R, D_LLM, D_TXT = 2, 6, 40, 32


@pytest.fixture
def qformer() -> QFormerBridge:
    torch.manual_seed(0)
    return QFormerBridge(
        encoder_hidden_size=D_LLM,
        output_dim=D_TXT,
        num_queries=77,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        intermediate_size=96,
        dropout=0.0,
    ).eval()


def test_qformer_is_blip2_with_learned_queries(qformer: QFormerBridge) -> None:
    from transformers import Blip2QFormerModel

    assert isinstance(qformer.model, Blip2QFormerModel)
    assert qformer.cross_attention_layers == [0]  # cross-attention every 2nd layer
    assert qformer.query_tokens.shape == (1, 77, 48)
    assert 0.015 < qformer.query_tokens.std().item() < 0.025  # N(0, 0.02)
    assert abs(qformer.query_tokens.mean().item()) < 0.003
    assert isinstance(qformer.out_proj, torch.nn.Linear)  # 48 -> 32 width map
    same = QFormerBridge(encoder_hidden_size=D_LLM, output_dim=48, hidden_size=48, num_layers=2, num_heads=4)
    assert isinstance(same.out_proj, torch.nn.Identity)


def test_qformer_cross_attention_reads_h_and_respects_mask(qformer: QFormerBridge) -> None:
    h = torch.randn(B, R, D_LLM)
    q = qformer(h)
    assert q.shape == (B, 77, D_TXT)
    # No mask is the same as an all-ones mask.
    torch.testing.assert_close(qformer(h, torch.ones(B, R, dtype=torch.long)), q)
    # Changing h changes q.
    h_changed = h.clone()
    h_changed[:, -1] += 3.0
    assert (qformer(h_changed) - q).abs().max() > 1e-3
    # Masking the last position makes it irrelevant ...
    mask = torch.ones(B, R, dtype=torch.long)
    mask[:, -1] = 0
    q_masked = qformer(h, mask)
    torch.testing.assert_close(qformer(h_changed, mask), q_masked, rtol=0, atol=1e-6)
    # ... and masking does matter when that position carries information.
    assert (q_masked - q).abs().max() > 1e-4
    # A row with no valid position is refused rather than turned into NaNs.
    with pytest.raises(ValueError, match="no valid"):
        qformer(h, torch.zeros(B, R, dtype=torch.long))


@pytest.fixture
def bim() -> BidirectionalInteraction:
    torch.manual_seed(0)
    return BidirectionalInteraction(
        text_dim=D_TXT, vision_dim=24, out_channels=16, dim=64, depth=2, mlp_dim=128, num_heads=4
    )


def test_bim_uses_sam_blocks_and_fixed_fourier_features(bim: BidirectionalInteraction) -> None:
    from transformers.models.sam.modeling_sam import SamPositionalEmbedding, SamTwoWayTransformer

    assert isinstance(bim.transformer, SamTwoWayTransformer)
    assert isinstance(bim.positional, SamPositionalEmbedding)
    assert len(bim.transformer.layers) == 2
    assert bim.transformer.layers[0].cross_attn_token_to_image.internal_dim == 32  # downsample 2
    names = [name for name, _ in bim.named_parameters()]
    assert not any("positional" in name for name in names)  # SAM keeps the Gaussian matrix as a buffer
    assert "positional.positional_embedding" in bim.state_dict()
    pe = bim.grid_embedding((3, 5), batch=2)
    assert pe.shape == (2, 64, 3, 5)
    assert pe[:, :32].abs().max() <= 1.0 and not torch.allclose(pe[0, :, 0, 0], pe[0, :, 2, 4])


def test_fresh_bim_changes_nothing(bim: BidirectionalInteraction) -> None:
    q = torch.randn(B, 77, D_TXT)
    features = torch.randn(B, 4 * 6, 24)
    f_txt, v_txt = bim(q, features, (4, 6), (8, 12))
    assert torch.equal(f_txt, q)
    assert v_txt.shape == (B, 16, 8, 12)
    assert torch.equal(v_txt, torch.zeros_like(v_txt))
    # A leading CLS token is dropped; a wrong token count is refused.
    with_cls = torch.cat([torch.randn(B, 1, 24), features], dim=1)
    assert torch.equal(bim(q, with_cls, (4, 6), (8, 12))[0], q)
    with pytest.raises(ValueError, match="grid"):
        bim(q, features[:, :-3], (4, 6), (8, 12))


def test_bim_heads_learn_after_one_step(bim: BidirectionalInteraction) -> None:
    q = torch.randn(B, 77, D_TXT)
    features = torch.randn(B, 16, 24)
    f_txt, v_txt = bim(q, features, (4, 4), (8, 8))
    loss = (f_txt - 1.0).pow(2).mean() + (v_txt - 1.0).pow(2).mean()
    loss.backward()
    # Zero heads pass no gradient inward on the first step; the heads themselves get one.
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in bim.transformer.parameters())
    assert bim.text_head.weight.grad.abs().max() > 0 and bim.visual_head.weight.grad.abs().max() > 0
    torch.optim.SGD(bim.parameters(), lr=0.1).step()
    assert bim.text_head.weight.abs().max() > 0 and bim.visual_head.weight.abs().max() > 0
    with torch.no_grad():
        f_txt2, v_txt2 = bim(q, features, (4, 4), (8, 8))
    assert (f_txt2 - q).abs().max() > 1e-4
    assert v_txt2.abs().max() > 1e-4
    assert ((f_txt2 - 1.0).pow(2).mean() + (v_txt2 - 1.0).pow(2).mean()) < loss


def test_mapper_mean_pools_valid_positions() -> None:
    torch.manual_seed(0)
    mapper = Mapper(D_LLM, 32, hidden_dim=64)
    h = torch.randn(B, R, D_LLM)
    out = mapper(h)
    assert out.shape == (B, 32)
    torch.testing.assert_close(out, mapper.mlp(mapper.norm(h.mean(dim=1))))
    mask = torch.ones(B, R)
    mask[:, 3:] = 0
    torch.testing.assert_close(mapper(h, mask), mapper(h[:, :3]))


def test_clip_image_encoder_is_frozen_and_loads_local_weights(tmp_path) -> None:
    torch.manual_seed(0)
    clip = build_clip_image_encoder(TINY_CLIP_CONFIG)
    assert clip.embed_dim == 32 and clip.image_size == (32, 32)
    assert all(not p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training and not clip.visual.training
    pixels = torch.randn(B, 3, 32, 32)
    embeds = clip.encode_image(pixels)
    assert embeds.shape == (B, 32) and not embeds.requires_grad
    large = torch.randn(B, 3, 64, 64)  # other sizes are resized to the tower's (bicubic, antialiased)
    resized = F.interpolate(large, size=(32, 32), mode="bicubic", antialias=True)
    torch.testing.assert_close(clip.encode_image(large), clip.encode_image(resized))

    # A weights file is only read when named; a missing one is a clear user error, never a download.
    with pytest.raises(UserError, match="neither a file nor a known tag"):
        build_clip_image_encoder("ViT-L-14", pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(UserError, match="config dict"):
        build_clip_image_encoder(TINY_CLIP_CONFIG, pretrained="openai")

    # The local-file path through open_clip.create_model, on a registered tiny config.
    (tmp_path / "insightedit-bridging-test.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(tmp_path / "insightedit-bridging-test.json")
    source = open_clip.CLIP(**TINY_CLIP_CONFIG)
    torch.save(source.state_dict(), tmp_path / "weights.bin")
    loaded = build_clip_image_encoder("insightedit-bridging-test", pretrained=str(tmp_path / "weights.bin"))
    built = loaded.visual.state_dict()  # construction reads no weights: the tower is a fresh one until loaded
    assert not all(torch.equal(built[name], tensor) for name, tensor in source.visual.state_dict().items())
    loaded.load_pretrained()
    for name, tensor in source.visual.state_dict().items():
        assert torch.equal(loaded.visual.state_dict()[name], tensor), name
