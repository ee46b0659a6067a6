"""The Q-Former: learned queries that read the MLLM's [MM] hidden states through cross-attention.

It is ``transformers.Blip2QFormerModel`` (BLIP-2's BERT-style Q-Former) with InsightEdit's sizes: 77
learned queries (one per text-condition position of the UNet), 6 layers with cross-attention in every
second one, hidden 768, cross-attention keys and values read from ``h`` (B, r, d_llm). When the Q-Former
is narrower or wider than the UNet's text condition (the tiny twins), a Linear maps its output there.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


def qformer_config(
    encoder_hidden_size: int,
    hidden_size: int = 768,
    num_layers: int = 6,
    num_heads: int = 12,
    intermediate_size: int = 3072,
    cross_attention_frequency: int = 2,
    dropout: float = 0.1,
    attn_implementation: str = "sdpa",
) -> Blip2QFormerConfig:
    """A ``Blip2QFormerConfig`` for queries only (no text input) reading states of width ``encoder_hidden_size``."""
    config = Blip2QFormerConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        use_qformer_text_input=False,
    )
    config._attn_implementation = attn_implementation
    return config


def full_attention_mask(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Return ``mask`` as a long (B, r) tensor (all ones when ``None``); refuse rows with no valid position."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    if mask.shape != (batch, length):
        raise ValueError(f"mm_mask must have shape {(batch, length)}, got {tuple(mask.shape)}")
    mask = mask.to(device=device, dtype=torch.long)
    if mask.device.type != "meta" and bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("mm_mask has a row with no valid [MM] position")
    return mask


class QFormerBridge(nn.Module):
    """Learned queries + ``Blip2QFormerModel`` over ``h`` + a width map: (B, r, d_llm) -> q (B, Nq, D_txt).

    Args:
        encoder_hidden_size: d_llm, the width of the MLLM's hidden states ``h``.
        output_dim: width of the UNet's text condition (768 for SD1.5); a Linear maps the Q-Former's
            hidden size to it when they differ, otherwise the output is the Q-Former's own.
        num_queries: number of learned queries (77, the CLIP text length).
        hidden_size, num_layers, num_heads, intermediate_size, cross_attention_frequency, dropout:
            the Q-Former's sizes (BLIP-2 / InsightEdit full: 768, 6, 12, 3072, 2, 0.1).
        init_std: standard deviation of the queries' normal initialisation (0.02).
    """

    def __init__(
        self,
        encoder_hidden_size: int,
        output_dim: int,
        num_queries: int = 77,
        hidden_size: int = 768,
        num_layers: int = 6,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        dropout: float = 0.1,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.config = qformer_config(
            encoder_hidden_size=encoder_hidden_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_frequency,
            dropout=dropout,
        )
        self.model = Blip2QFormerModel(self.config)
        self.query_tokens = nn.Parameter(torch.empty(1, num_queries, hidden_size))  # (1, Nq, H)
        nn.init.normal_(self.query_tokens, mean=0.0, std=init_std)
        self.out_proj: nn.Module = nn.Linear(hidden_size, output_dim) if hidden_size != output_dim else nn.Identity()
        self.num_queries = num_queries
        self.output_dim = output_dim

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the layers that cross-attend to ``h``."""
        return [index for index, layer in enumerate(self.model.encoder.layer) if layer.has_cross_attention]

    def forward(self, h: torch.Tensor, mm_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries attend to ``h`` (B, r, d_llm), masked by ``mm_mask`` (B, r); return q (B, Nq, D_txt)."""
        batch, length, _ = h.shape
        # No mask means every [MM] position is valid: the same as an all-ones mask, without building one.
        mask = full_attention_mask(mm_mask, batch, length, h.device) if mm_mask is not None else None  # (B, r)
        queries = self.query_tokens.expand(batch, -1, -1)  # (B, Nq, H)
        out = self.model(
            query_embeds=queries,
            encoder_hidden_states=h,
            encoder_attention_mask=mask,
        ).last_hidden_state  # (B, Nq, H), float32 (BLIP-2 keeps the Q-Former in fp32)
        return self.out_proj(out.to(self.query_tokens.dtype))  # (B, Nq, D_txt)
