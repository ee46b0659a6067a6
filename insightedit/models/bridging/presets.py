"""Presets of the bridging model: the paper's sizes (``full``) and a CPU twin (``tiny``).

Component builders (:class:`QFormerBridge`, :class:`BidirectionalInteraction`, :class:`Mapper`,
:func:`build_clip_image_encoder`) take every size as an argument; a preset only chooses sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from insightedit.models.bridging.bim import BidirectionalInteraction
from insightedit.models.bridging.iaa import Mapper, build_clip_image_encoder
from insightedit.models.bridging.model import BridgingModel
from insightedit.models.bridging.qformer import QFormerBridge

CLIP_TWIN_SEED = 20250612

# A tiny open_clip model: only its image tower is kept; the text tower is the smallest open_clip accepts.
# Its image tower has the tiny CLIP foundation's shapes (the tiny LLaVA's vision tower, TINY_VISION_CONFIG:
# width 64, 2 layers, 4 heads, MLP 128, 4-px patches of 32 px, QuickGELU; projection 32), so
# ``clip_pretrained: checkpoints/tiny/foundations/clip/export`` loads that CLIP (random without it).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "mlp_ratio": 2.0, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@dataclass(frozen=True)
class BridgingSizes:
    """Every size of the bridging model; a preset is one instance."""

    d_llm: int
    d_vision: int
    text_dim: int
    unet_in_width: int
    clip_dim: int
    qformer_hidden: int
    qformer_layers: int
    qformer_heads: int
    qformer_intermediate: int
    qformer_dropout: float
    bim_dim: int
    bim_depth: int
    bim_mlp_dim: int
    bim_heads: int
    bim_downsample: int
    mapper_hidden: int
    clip_model: str | dict[str, Any] = field(default="ViT-L-14")
    clip_quick_gelu: bool = False


PRESETS: dict[str, BridgingSizes] = {
    # LLaVA-1.5-7B (d_llm 4096, CLIP ViT-L/14-336 patches 24x24x1024) -> SD1.5 (text 768, conv_in 320);
    # IAA target: open_clip ViT-L-14 with OpenAI's weights (QuickGELU), 768-d.
    "full": BridgingSizes(
        d_llm=4096,
        d_vision=1024,
        text_dim=768,
        unet_in_width=320,
        clip_dim=768,
        qformer_hidden=768,
        qformer_layers=6,
        qformer_heads=12,
        qformer_intermediate=3072,
        qformer_dropout=0.1,
        bim_dim=1024,
        bim_depth=2,
        bim_mlp_dim=2048,
        bim_heads=8,
        bim_downsample=2,
        mapper_hidden=2048,
        clip_model="ViT-L-14",
        clip_quick_gelu=True,
    ),
    # Matches the tiny LLaVA (d <= 128), the tiny UNet (cross-attention 32, conv_in 64) and TINY_CLIP_CONFIG.
    "tiny": BridgingSizes(
        d_llm=64,
        d_vision=48,
        text_dim=32,
        unet_in_width=64,
        clip_dim=32,
        qformer_hidden=48,
        qformer_layers=2,
        qformer_heads=4,
        qformer_intermediate=96,
        qformer_dropout=0.0,
        bim_dim=64,
        bim_depth=2,
        bim_mlp_dim=128,
        bim_heads=4,
        bim_downsample=2,
        mapper_hidden=64,
        clip_model=TINY_CLIP_CONFIG,
    ),
}


def preset_sizes(preset: str, **overrides: Any) -> BridgingSizes:
    """The sizes of ``preset`` with ``overrides`` (``None`` values ignored) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown bridging preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **{key: value for key, value in overrides.items() if value is not None})


def build_bridging_from_sizes(
    sizes: BridgingSizes,
    num_queries: int = 77,
    use_bim: bool = True,
    clip_pretrained: str | None = None,
    with_clip: bool = True,
    device: str | None = None,
    with_bim: bool = True,
    with_mapper: bool = True,
) -> BridgingModel:
    """Build a :class:`BridgingModel` of the given sizes (``device="meta"``: shapes only, no memory).

    ``with_bim=False`` / ``with_mapper=False`` leave the BIM / the IAA Mapper (and its CLIP) out entirely.
    """
    target = torch.device(device) if device is not None else torch.get_default_device()
    with target:
        qformer = QFormerBridge(
            encoder_hidden_size=sizes.d_llm,
            output_dim=sizes.text_dim,
            num_queries=num_queries,
            hidden_size=sizes.qformer_hidden,
            num_layers=sizes.qformer_layers,
            num_heads=sizes.qformer_heads,
            intermediate_size=sizes.qformer_intermediate,
            dropout=sizes.qformer_dropout,
        )
        bim = None if not with_bim else BidirectionalInteraction(
            text_dim=sizes.text_dim,
            vision_dim=sizes.d_vision,
            out_channels=sizes.unet_in_width,
            dim=sizes.bim_dim,
            depth=sizes.bim_depth,
            mlp_dim=sizes.bim_mlp_dim,
            num_heads=sizes.bim_heads,
            attention_downsample_rate=sizes.bim_downsample,
        )
        mapper = Mapper(sizes.d_llm, sizes.clip_dim, hidden_dim=sizes.mapper_hidden) if with_mapper else None
    clip = None
    if with_clip and with_mapper:
        clip_model = sizes.clip_model
        if isinstance(clip_model, dict):  # a config-built twin takes the IAA width it is asked for
            clip_model = {**clip_model, "embed_dim": sizes.clip_dim}
        # a config-built CLIP is a frozen "base model": a fixed seed makes it the same in every run, so
        # checkpoints that keep only trained weights restore it exactly
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(CLIP_TWIN_SEED)
            clip = build_clip_image_encoder(
                clip_model, pretrained=clip_pretrained, quick_gelu=sizes.clip_quick_gelu, device=target
            )
        if clip.embed_dim != sizes.clip_dim:
            raise ValueError(f"CLIP embeds {clip.embed_dim}-d vectors but the Mapper gives {sizes.clip_dim}-d")
    return BridgingModel(qformer, bim, mapper, clip, use_bim=use_bim)


def build_bridging(
    preset: str = "tiny",
    d_llm: int | None = None,
    d_vision: int | None = None,
    text_dim: int | None = None,
    unet_in_width: int | None = None,
    clip_dim: int | None = None,
    num_queries: int = 77,
    use_bim: bool = True,
    clip_pretrained: str | None = None,
    device: str | None = None,
    with_bim: bool = True,
    with_mapper: bool = True,
    **size_overrides: Any,
) -> BridgingModel:
    """Build the bridging model of ``preset`` (``"full"`` or ``"tiny"``), with the widths that meet its neighbours.

    Args:
        preset: chooses every size not given here (see :data:`PRESETS`).
        d_llm: the MLLM's hidden size (width of ``h``).
        d_vision: the vision encoder's patch-feature width.
        text_dim: the UNet's cross-attention (text condition) width.
        unet_in_width: C0, the UNet's ``conv_in`` output width (channels of ``v_txt``).
        clip_dim: the IAA embedding width; must equal the CLIP model's embedding width.
        num_queries: Q-Former queries (77, the text condition's length).
        use_bim: run the BIM in ``forward`` (settable later as ``model.use_bim``).
        clip_pretrained: ``None`` (random CLIP, no download), a local open_clip checkpoint, a tag, or a
            transformers CLIP folder (tiny: ``checkpoints/tiny/foundations/clip/export``).
        device: where to build; ``"meta"`` builds shapes only.
        with_bim, with_mapper: build the BIM / the IAA Mapper and its CLIP at all.
        size_overrides: any other :class:`BridgingSizes` field (``qformer_layers``, ``bim_dim``...).
    """
    unknown = set(size_overrides) - set(BridgingSizes.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown bridging settings {sorted(unknown)}")
    sizes = preset_sizes(
        preset, d_llm=d_llm, d_vision=d_vision, text_dim=text_dim, unet_in_width=unet_in_width, clip_dim=clip_dim,
        **size_overrides,
    )  # fmt: skip
    return build_bridging_from_sizes(
        sizes, num_queries=num_queries, use_bim=use_bim, clip_pretrained=clip_pretrained, device=device,
        with_bim=with_bim, with_mapper=with_mapper,
    )  # fmt: skip


def describe(sizes: BridgingSizes) -> dict[str, Any]:
    """The sizes as a plain dict (for logs and checkpoints)."""
    return asdict(sizes)
