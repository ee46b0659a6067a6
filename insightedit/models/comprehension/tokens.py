"""The r special [MM] tokens: added to the tokenizer, given new embedding rows that alone are trainable.

How the original rows stay unchanged bit for bit: they are never trainable. Instead of resizing the
embedding and restoring or masking the old rows (SmartEdit restores them each forward; a gradient hook
would still let AdamW's weight decay move them), the LLM's input embedding and output head are wrapped:
the frozen original matrix answers every old id, and a separate ``(r, d)`` parameter answers the r new
ids. So the optimizer only ever sees ``2 · r · d`` embedding numbers (not 2 × 131M for LLaVA-1.5-7B,
which also keeps optimizer state small and FSDP simple), weight decay cannot touch the old rows, and the
base checkpoint stays the untouched file it was loaded from.

New rows start at the mean of the rows of the tokens the tokenizer already had (llava-hf pads its
matrix to 32064 rows while its tokenizer has 32002 tokens; the padding rows are not averaged).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def mm_token_names(num_tokens: int) -> list[str]:
    """The [MM] token strings ``[MM0]`` ... ``[MM{r-1}]``."""
    if num_tokens < 1:
        raise ValueError(f"num_mm_tokens must be >= 1, got {num_tokens}")
    return [f"[MM{i}]" for i in range(num_tokens)]


def add_mm_tokens(tokenizer: PreTrainedTokenizerBase, num_tokens: int) -> int:
    """Add the [MM] tokens to ``tokenizer`` as special tokens (if missing); return the id of ``[MM0]``.

    Their ids must be consecutive, which holds when they are added together (or were saved so).
    """
    names = mm_token_names(num_tokens)
    tokenizer.add_tokens(names, special_tokens=True)
    ids = cast(list[int], tokenizer.convert_tokens_to_ids(names))
    first = int(ids[0])
    if list(ids) != list(range(first, first + num_tokens)):
        raise ValueError(f"the [MM] token ids are not consecutive: {ids}")
    return first


def mean_row(weight: torch.Tensor, num_rows: int, count: int) -> torch.Tensor:
    """``count`` copies of the mean of the first ``num_rows`` rows of ``weight`` (computed in fp32)."""
    mean = weight[:num_rows].detach().float().mean(dim=0)  # (d,)
    return mean.to(weight.dtype).expand(count, -1).clone()  # (count, d)


class NewRowsEmbedding(nn.Module):
    """An input embedding whose ids ``first_id .. first_id + r - 1`` read trainable new rows.

    Every other id reads the frozen original ``base`` embedding, which is never given to an optimizer.
    """

    def __init__(self, base: nn.Embedding, first_id: int, num_new: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.first_id = int(first_id)
        self.num_new = int(num_new)
        self.new_rows = nn.Parameter(mean_row(base.weight, min(first_id, base.num_embeddings), num_new))

    @property
    def embedding_dim(self) -> int:
        """Width of one embedding row."""
        return int(self.base.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``input_ids`` (B, L) -> (B, L, d)."""
        offset = input_ids - self.first_id
        is_new = (offset >= 0) & (offset < self.num_new)  # (B, L)
        old = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))  # (B, L, d)
        new = F.embedding(offset.clamp(0, self.num_new - 1), self.new_rows)  # (B, L, d)
        return torch.where(is_new.unsqueeze(-1), new.to(old.dtype), old)


class NewRowsHead(nn.Module):
    """An output head whose logits for ids ``first_id .. first_id + r - 1`` come from trainable new rows.

    Logits have ``max(V, first_id + r)`` entries: the frozen head's logits with the [MM] ids' entries
    replaced by ``hidden @ new_rows.T``. ``new_rows`` may be shared with the input side (tied weights).
    """

    def __init__(self, base: nn.Module, first_id: int, num_new: int, new_rows: nn.Parameter | None = None) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.first_id = int(first_id)
        self.num_new = int(num_new)
        weight = cast(torch.Tensor, base.weight)
        out_features = int(weight.shape[0])
        self.vocab_size = max(out_features, self.first_id + self.num_new)
        if new_rows is None:
            new_rows = nn.Parameter(mean_row(weight, min(first_id, out_features), num_new))
        self.new_rows = new_rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab_size) for hidden states (..., d)."""
        old = self.base(hidden)  # (..., V)
        if self.vocab_size > old.shape[-1]:
            old = F.pad(old, (0, self.vocab_size - old.shape[-1]))
        new = F.linear(hidden, self.new_rows.to(hidden.dtype)).to(old.dtype)  # (..., r)
        return torch.cat([old[..., : self.first_id], new, old[..., self.first_id + self.num_new :]], dim=-1)


def install_mm_rows(model: PreTrainedModel, first_id: int, num_new: int) -> tuple[NewRowsEmbedding, NewRowsHead]:
    """Wrap ``model``'s input embedding and output head with new [MM] rows; return the two wrappers.

    With tied input and output embeddings the two wrappers share one new-rows parameter.
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if isinstance(embedding, NewRowsEmbedding) or isinstance(head, NewRowsHead):
        raise RuntimeError("the [MM] rows are already installed on this model")
    if not isinstance(embedding, nn.Embedding) or head is None:
        raise TypeError(f"expected an nn.Embedding input and an output head, got {type(embedding).__name__}")
    tied = head.weight is embedding.weight
    new_embedding = NewRowsEmbedding(embedding, first_id, num_new)
    new_head = NewRowsHead(head, first_id, num_new, new_embedding.new_rows if tied else None)
    model.set_input_embeddings(new_embedding)
    model.lm_head = new_head
    return new_embedding, new_head
