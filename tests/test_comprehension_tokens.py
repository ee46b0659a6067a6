"""The comprehension module's tokenizer, prompts and [MM] rows (no LLaVA forward needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from insightedit.models.comprehension.prompts import IGNORE_INDEX, PromptEncoder
from insightedit.models.comprehension.tiny_tokenizer import train_tiny_tokenizer
from insightedit.models.comprehension.tokens import (
    NewRowsEmbedding,
    NewRowsHead,
    add_mm_tokens,
    mean_row,
    mm_token_names,
)

SENTENCES = [
    "Remove the red circle.",
    "add a purple triangle in the bottom right",
    "Put a square the colour of a ripe tomato to the left of the green circle.",
    "Zebra? xylophone! 42 - unseen words still tokenise",
]


@pytest.fixture(autouse=True, scope="module")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSIGHTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "insightedit-cache"))
        yield


def test_tiny_tokenizer_is_deterministic_and_offline(tmp_path):
    first, second = train_tiny_tokenizer(), train_tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    ids = [first(text)["input_ids"] for text in SENTENCES]
    assert ids == [second(text)["input_ids"] for text in SENTENCES]
    first.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert [reloaded(text)["input_ids"] for text in SENTENCES] == ids
    assert reloaded.chat_template == first.chat_template
    # Llama-style: BOS first, a real pad token, LLaVA's image token, no <unk> for ASCII text.
    assert all(row[0] == reloaded.bos_token_id for row in ids)
    assert reloaded.pad_token == "<pad>" and reloaded.convert_tokens_to_ids("<image>") != reloaded.unk_token_id
    assert all(reloaded.unk_token_id not in row for row in ids)


def test_mm_tokens_are_added_with_consecutive_ids():
    tokenizer = train_tiny_tokenizer()
    size = len(tokenizer)
    first = add_mm_tokens(tokenizer, 32)
    assert first == size and len(tokenizer) == size + 32
    assert mm_token_names(3) == ["[MM0]", "[MM1]", "[MM2]"]
    assert tokenizer.convert_tokens_to_ids(["[MM0]", "[MM31]"]) == [size, size + 31]
    assert add_mm_tokens(tokenizer, 32) == first  # idempotent: a saved tokenizer keeps its ids
    assert tokenizer("[MM7][MM8]", add_special_tokens=False)["input_ids"] == [size + 7, size + 8]


def test_prompt_is_llava15_chat_format_with_mm_answer():
    tokenizer = train_tiny_tokenizer()
    add_mm_tokens(tokenizer, 4)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    encoder = PromptEncoder(tokenizer, mm_token_names(4), image_id, num_image_tokens=16)
    assert encoder.prompt("Remove the red circle.") == (
        "USER: <image>\nRemove the red circle. ASSISTANT: [MM0][MM1][MM2][MM3]"
    )
    batch = encoder(["Remove the red circle.", "add a blue square in the top left corner please"])
    mm_ids = torch.tensor(tokenizer.convert_tokens_to_ids(mm_token_names(4)))
    assert batch.input_ids.shape == batch.labels.shape == batch.mm_mask.shape
    assert (batch.input_ids == image_id).sum(dim=1).tolist() == [16, 16]  # one token per patch
    assert batch.mm_mask.sum(dim=1).tolist() == [4, 4]
    assert torch.equal(batch.input_ids[:, -4:], mm_ids.expand(2, 4))  # left padding: answer last
    assert torch.equal(batch.labels[batch.mm_mask], batch.input_ids[batch.mm_mask])
    assert bool((batch.labels[~batch.mm_mask] == IGNORE_INDEX).all())
    assert batch.attention_mask[0, 0] == 0 and batch.position_ids[0][batch.attention_mask[0].bool()][0] == 0
    with pytest.raises(ValueError, match="exactly once"):
        encoder(["say [MM2] please"])
    # A text-only (Vicuna-style) template gets the image token inside the text: the same prompt.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    assert encoder.prompt("Remove the red circle.").startswith("USER: <image>\nRemove the red circle. ASSISTANT: [MM0]")


def test_new_rows_embedding_reads_old_and_new_rows():
    torch.manual_seed(0)
    base = nn.Embedding(10, 6)
    # llava-hf layout: the tokenizer has 8 tokens but the matrix 10 rows, so [MM] ids 8.. overlap padding rows.
    embedding = NewRowsEmbedding(base, first_id=8, num_new=4)
    assert torch.equal(embedding.new_rows, mean_row(base.weight, 8, 4))
    assert torch.allclose(embedding.new_rows[0], base.weight[:8].mean(dim=0))
    ids = torch.tensor([[0, 7, 8, 11, 9]])
    with torch.no_grad():
        embedding.new_rows.copy_(torch.arange(24.0).view(4, 6))
        out = embedding(ids)  # (1, 5, 6)
    assert torch.equal(out[0, :2], base.weight[[0, 7]])
    assert torch.equal(out[0, 2:], embedding.new_rows[[0, 3, 1]])
    assert not base.weight.requires_grad and embedding.new_rows.requires_grad


def test_new_rows_head_replaces_mm_logits_only():
    torch.manual_seed(0)
    base = nn.Linear(6, 10, bias=False)
    head = NewRowsHead(base, first_id=8, num_new=4)
    assert head.vocab_size == 12
    hidden = torch.randn(3, 6)
    logits = head(hidden)  # (3, 12)
    assert logits.shape == (3, 12)
    assert torch.equal(logits[:, :8], base(hidden)[:, :8])
    assert torch.allclose(logits[:, 8:], hidden @ head.new_rows.T)
    tied = NewRowsHead(base, first_id=10, num_new=2, new_rows=nn.Parameter(torch.ones(2, 6)))
    assert tied(hidden).shape == (3, 12) and torch.equal(tied(hidden)[:, :10], base(hidden))
