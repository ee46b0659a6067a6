"""BIM, the bidirectional interaction module: SAM's two-way transformer between queries and patches.

It runs between the Q-Former queries and the vision encoder's patch features. The blocks are
``transformers.models.sam``'s: ``SamTwoWayTransformer`` (per block: query self-attention, token->image
cross-attention, MLP, image->token cross-attention; then a final token->image attention and LayerNorm)
and ``SamPositionalEmbedding`` (random-Fourier encoding of the patch grid). What InsightEdit adds is
written here: the input projections and the two outputs

- ``f_txt = q + 0.5 * ZeroLinear(dim -> D_txt)(tokens)``, the UNet's text condition, and
- ``v_txt = ZeroConv1x1(dim -> C0)(bilinear_resize(image_tokens -> latent grid))``, added to ``conv_in``'s
  output.

Both heads start at zero, so a fresh BIM changes nothing: ``f_txt == q`` and ``v_txt == 0`` exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamPositionalEmbedding, SamTwoWayTransformer


def two_way_config(
    dim: int = 1024,
    depth: int = 2,
    mlp_dim: int = 2048,
    num_heads: int = 8,
    attention_downsample_rate: int = 2,
    attn_implementation: str = "sdpa",
) -> SamMaskDecoderConfig:
    """A ``SamMaskDecoderConfig`` that sizes ``SamTwoWayTransformer`` (only its transformer fields matter)."""
    config = SamMaskDecoderConfig(
        hidden_size=dim,
        num_hidden_layers=depth,
        mlp_dim=mlp_dim,
        num_attention_heads=num_heads,
        attention_downsample_rate=attention_downsample_rate,
    )
    config._attn_implementation = attn_implementation
    return config


def fixed_fourier_embedding(dim: int, scale: float = 1.0) -> SamPositionalEmbedding:
    """SAM's random-Fourier positional encoding giving ``dim`` channels; its Gaussian matrix is a fixed buffer.

    transformers stores the matrix as a ``Parameter`` (to load SAM checkpoints); SAM itself registers it as
    a buffer with ``scale`` 1.0. We follow SAM: the features are random and never trained, and the buffer
    is saved with the module's state dict.
    """
    if dim % 2:
        raise ValueError(f"the positional encoding needs an even width, got {dim}")
    module = SamPositionalEmbedding(SimpleNamespace(scale=scale, num_pos_feats=dim // 2))
    gaussian = module.positional_embedding.detach()  # (2, dim / 2)
    del module.positional_embedding
    module.register_buffer("positional_embedding", gaussian)
    return module


def grid_coordinates(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Patch-centre coordinates in [0, 1] of a (gh, gw) grid, as SAM computes them: (gh, gw, 2) in (x, y)."""
    gh, gw = grid
    ys = (torch.arange(gh, device=device, dtype=dtype) + 0.5) / gh  # (gh,)
    xs = (torch.arange(gw, device=device, dtype=dtype) + 0.5) / gw  # (gw,)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (gh, gw) each
    return torch.stack([xx, yy], dim=-1)  # (gh, gw, 2)


def as_patch_grid(vision_features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Check (B, N, d) patch features against ``grid``; a leading CLS token (N = gh*gw + 1) is dropped."""
    gh, gw = grid
    count = vision_features.shape[1]
    if count == gh * gw + 1:
        return vision_features[:, 1:]
    if count != gh * gw:
        raise ValueError(f"vision_features has {count} tokens, but the grid {gh}x{gw} needs {gh * gw} (+1 CLS)")
    return vision_features


class BidirectionalInteraction(nn.Module):
    """BIM: q (B, Nq, D_txt) and patch features (B, gh*gw, d_vision) -> f_txt (B, Nq, D_txt), v_txt (B, C0, h, w).

    Args:
        text_dim: width of q and f_txt (768 for SD1.5).
        vision_dim: width of the vision encoder's patch features (1024 for CLIP ViT-L/14-336).
        out_channels: C0, the UNet's ``conv_in`` width (320 for SD1.5).
        dim, depth, mlp_dim, num_heads, attention_downsample_rate: the two-way transformer's sizes
            (InsightEdit: 1024, 2, 2048, 8, 2).
        text_scale: weight of the token head's residual in f_txt (0.5).
    """

    def __init__(
        self,
        text_dim: int,
        vision_dim: int,
        out_channels: int,
        dim: int = 1024,
        depth: int = 2,
        mlp_dim: int = 2048,
        num_heads: int = 8,
        attention_downsample_rate: int = 2,
        text_scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.config = two_way_config(dim, depth, mlp_dim, num_heads, attention_downsample_rate)
        self.query_in = nn.Linear(text_dim, dim)
        # SAM's image embeddings leave its neck layer-normed; CLIP's penultimate features are not.
        self.vision_in = nn.Sequential(nn.Linear(vision_dim, dim), nn.LayerNorm(dim))
        self.positional = fixed_fourier_embedding(dim)
        self.transformer = SamTwoWayTransformer(self.config)
        self.text_head = nn.Linear(dim, text_dim)
        self.visual_head = nn.Conv2d(dim, out_channels, kernel_size=1)
        self.text_scale = text_scale
        self.zero_heads()

    def zero_heads(self) -> None:
        """Set both output heads to zero (so the module is an identity on q and adds nothing to the UNet)."""
        for head in (self.text_head, self.visual_head):
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)

    def grid_embedding(self, grid: tuple[int, int], batch: int) -> torch.Tensor:
        """The random-Fourier encoding of the patch grid, (B, dim, gh, gw) as ``SamTwoWayTransformer`` wants."""
        gaussian = self.positional.positional_embedding
        coords = grid_coordinates(grid, gaussian.device, gaussian.dtype)  # (gh, gw, 2)
        encoding = self.positional(coords)  # (gh, gw, dim)
        return encoding.permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1)  # (B, dim, gh, gw)

    def forward(
        self,
        q: torch.Tensor,
        vision_features: torch.Tensor,
        vision_grid: tuple[int, int],
        latent_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Let queries and patches attend to each other; return ``(f_txt, v_txt)``."""
        gh, gw = vision_grid
        batch = q.shape[0]
        patches = as_patch_grid(vision_features, vision_grid)  # (B, gh*gw, d_vision)
        patches = self.vision_in(patches.to(q.dtype))  # (B, gh*gw, dim)
        image = patches.transpose(1, 2).reshape(batch, -1, gh, gw)  # (B, dim, gh, gw)
        tokens = self.query_in(q).unsqueeze(1)  # (B, 1, Nq, dim): SAM's point-batch axis of size 1
        pos = self.grid_embedding(vision_grid, batch).to(image.dtype)  # (B, dim, gh, gw)
        tokens, image_tokens = self.transformer(
            point_embeddings=tokens,
            image_embeddings=image,
            image_positional_embeddings=pos,
            attention_similarity=None,
        )  # (B, 1, Nq, dim), (B, 1, gh*gw, dim)
        f_txt = q + self.text_scale * self.text_head(tokens.squeeze(1))  # (B, Nq, D_txt)
        image_map = image_tokens.squeeze(1).transpose(1, 2).reshape(batch, -1, gh, gw)  # (B, dim, gh, gw)
        # A 1x1 conv commutes with bilinear resizing (whose weights sum to one), so apply it on the smaller
        # grid first: same v_txt as resize-then-conv, at a fraction of the cost when the latent is larger.
        v_txt = self.visual_head(image_map)  # (B, C0, gh, gw)
        if (gh, gw) != tuple(latent_size):
            v_txt = F.interpolate(v_txt, size=tuple(latent_size), mode="bilinear", align_corners=False)
        return f_txt, v_txt  # (B, Nq, D_txt), (B, C0, h, w)
