"""A Llama-style tokenizer for the tiny LLaVA twin, trained offline on the synthetic-scene vocabulary.

The tiny twin must tokenise instructions with no download, so we train a small byte-level-free BPE
(Metaspace pre-tokeniser, like Llama's SentencePiece) with the ``tokenizers`` library on a fixed corpus
embedded here, seeded with every printable ASCII character so that no instruction maps to ``<unk>``.
It carries LLaVA's ``<image>`` token, a pad token and LLaVA-1.5's chat template; the presets save it in
the Hugging Face format beside the tiny model, so the code that loads it is the code that loads llava-hf's.
"""

from __future__ import annotations

import itertools
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from insightedit.models.comprehension.prompts import IMAGE_TOKEN, LLAVA_15_CHAT_TEMPLATE

TINY_VOCAB_SIZE = 384
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)

_SHAPES = ("circle", "square", "triangle", "star", "heart", "object", "shape", "one", "thing")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "beige", "pale")
_LIKES = ("a ripe tomato", "fresh grass", "the deep sea", "a banana", "a grape", "the sky", "snow")
_VERBS = tuple("remove add replace change turn make put paint take find delete erase insert swap move".split())
_PLACES = (
    "in the top left", "in the top right", "in the bottom left", "in the bottom right", "at the top",
    "at the bottom", "on the left", "on the right", "in the centre", "to the left of", "to the right of",
    "above", "below", "next to", "in the corner", "in the middle",
)  # fmt: skip
_PHRASES = (
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    "Can you find the object that is not red? Take it out of the picture.",
    "the only object in the picture",
    "the object that is the same colour as the circle",
    "the object with the same shape as the blue one",
    "the round object",
    "the pointy object",
    "Please edit the image so that it shows",
    "a scene with a light grey background",
    "and it with of which into from by for is are was this that there it its the a an",
    "1 2 3 4 5 6 7 8 9 0 first second third left right top bottom middle centre upper lower",
)


def tiny_corpus() -> list[str]:
    """The fixed training corpus: templated edits over shapes, colours, places, plus free phrases."""
    lines = list(_PHRASES)
    for verb, colour, shape in itertools.product(_VERBS, _COLOURS, _SHAPES):
        lines.append(f"{verb.capitalize()} the {colour} {shape}.")
    for colour, shape, place in itertools.product(_COLOURS[:5], _SHAPES[:3], _PLACES):
        lines.append(f"add a {colour} {shape} {place}")
    for like, shape in itertools.product(_LIKES, _SHAPES[:3]):
        lines.append(f"Put a {shape} the colour of {like} on the left.")
        lines.append(f"Find the {shape} and make it the colour of {like}.")
    return lines + [f"USER: <image>\n{line} ASSISTANT:" for line in lines]


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the BPE on :func:`tiny_corpus` and wrap it as a Llama-style fast tokenizer (deterministic)."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\n▁"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(tiny_corpus(), trainer=trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=2048,
    )
    tokenizer.chat_template = LLAVA_15_CHAT_TEMPLATE
    return tokenizer
