"""MGIE (Fu et al., ICLR 2024): an MLLM's visual-token states → an edit head → the UNet's text condition.

The MLLM (LLaVA + LoRA) reads (image, instruction) and answers ``{expressive instruction} [IMG0]...[IMG{r-1}]``.
The last-layer hidden states at the r visual tokens, plus those tokens' own embedding rows, go through
the *edit head*: a linear map to its width, a transformer encoder over the r states and a decoder whose
77 learned queries read them, and a linear map to the UNet's text width. Its output ``(B, 77, D_txt)``
replaces the text encoder's encoding of the instruction; the UNet is InstructPix2Pix's, with no image
branch and no ``v_txt``. Losses: ``llm``, the NLL of the expressive instruction and the visual tokens;
``diff``, the diffusion loss; and our stage-1 ``align`` (below).

Stages (``insightedit zoo --member mgie``):

1 *align* (ours): [IMG] rows, LoRA and the edit head with ``L_LLM + L_align``, no UNet. ``L_align`` is
  the MSE between the head's output and the frozen text encoder's encoding of the explicit instruction
  (``plain_instruction``), so that the UNet, which was trained on that encoder, can read the head from
  the start (SmartEdit's alignment stage, applied to MGIE's head).
2 *edit* (ours): the edit head and the UNet with ``L_diff``, the MLLM frozen: the UNet learns to read
  the head before the diffusion loss's gradients reach the MLLM.
3 *full* (MGIE's recipe): everything jointly with ``L_LLM + 0.5 · L_diff``.

Deviations from the paper
-------------------------
- **Visual tokens.** The r [IMG] tokens are the comprehension module's [MM] tokens (``[MM0]``...,
  r = ``comprehension.num_mm_tokens``; MGIE: 8, our configs' default): new input and output rows that
  alone train in the embedding and LM head. MGIE trains the whole embedding and LM head; here the old
  rows stay frozen bit for bit (:mod:`insightedit.models.comprehension.tokens`).
- **MLLM.** LLaVA-1.5 + LoRA on the attention projections (MGIE: LLaVA-7B on Vicuna-1.1 with the
  language model frozen, LoRA optional). The prompt is the instruction in LLaVA-1.5's chat template
  (MGIE asks "what will this image be like if '{instruction}'").
- **Expressive instruction.** The teacher-forced text is the batch's ``plain_instruction`` (the record's
  explicit, templated phrasing; the MLLM reads the templated or the reasoning phrasing), where MGIE
  summarises a LLaVA description of the target. Batches without it are treated as at inference.
- **Where the states are read.** At the [IMG] positions themselves (as the zoo's other members read
  [MM]); MGIE reads the positions one earlier (the states that predict each [IMG] token).
- **Inference.** The MLLM writes the expressive instruction greedily (argmax, at most
  ``head.expressive_tokens`` tokens, up to its first [IMG] token or end of sequence; MGIE: 96 tokens with
  ``no_repeat_ngram_size=3``); then the r [IMG] tokens are appended and one teacher-forced forward
  reads their states, so training and inference build the same sequence and an edit is deterministic.
  MGIE reads the states of the tokens it generated (the last 8 positions if it wrote none).
  ``expressive_tokens: 0`` skips the text (one cheap forward; the states then follow the prompt
  directly, which training never shows).
- **Null condition.** Classifier-free guidance (dropout in training, the unconditional branches when
  sampling) uses the generator's shared null condition, the frozen text encoder's encoding of ``""``
  (the one InstructPix2Pix's UNet was trained with); MGIE uses the edit head applied to zero states.
- **Learning rates.** One per group (``lora`` 2e-4, ``head`` 5e-4, ``unet`` 1e-5); MGIE uses 5e-4 for
  everything. The diffusion loss follows the generator's settings (the tiny twin predicts the clean
  residual; the full preset keeps MGIE's ε-prediction).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from insightedit.errors import UserError
from insightedit.models.comprehension.model import ComprehensionModel
from insightedit.models.comprehension.presets import build_comprehension
from insightedit.models.editor import EditConditions, Editor
from insightedit.models.generation.generator import EditGenerator
from insightedit.models.stages import StageSettings

LEARNING_RATES = {"lora": 2e-4, "head": 5e-4, "unet": 1e-5}
NUM_VISUAL_TOKENS = 8  # MGIE's [IMG0..7]; the default r of this member
# MGIE's edit head (4096 -> 512, 4 heads, 4 + 4 layers, ff 2048, 77 queries -> 768); the tiny twin's is
# one that fits the tiny LLaVA (d 64) and the tiny UNet (cross-attention 32).
HEAD_PRESETS: dict[str, dict[str, int]] = {
    "full": {
        "width": 512,
        "num_heads": 4,
        "num_encoder_layers": 4,
        "num_decoder_layers": 4,
        "ff_dim": 2048,
        "num_queries": 77,
        "expressive_tokens": 32,
    },
    "tiny": {
        "width": 48,
        "num_heads": 4,
        "num_encoder_layers": 1,
        "num_decoder_layers": 1,
        "ff_dim": 96,
        "num_queries": 77,
        "expressive_tokens": 16,
    },
}


class EditHead(nn.Module):
    """MGIE's edit head: r visual-token states (+ their embedding rows) → 77 text-condition vectors.

    Args:
        d_llm: the MLLM's hidden width.
        text_dim: the UNet's cross-attention (text) width.
        width, num_heads, num_encoder_layers, num_decoder_layers, ff_dim: the transformer's sizes.
        num_queries: the learned queries, one per output vector (77: the text encoder's length).
        expressive_tokens: how many tokens of expressive instruction the MLLM may write at inference
            before the visual tokens (``0``: none). Kept here because it is how the head's input is made.
    """

    def __init__(
        self,
        d_llm: int,
        text_dim: int,
        width: int = 512,
        num_heads: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        ff_dim: int = 2048,
        num_queries: int = 77,
        expressive_tokens: int = 32,
    ) -> None:
        super().__init__()
        self._config: dict[str, int] = {
            "d_llm": d_llm,
            "text_dim": text_dim,
            "width": width,
            "num_heads": num_heads,
            "num_encoder_layers": num_encoder_layers,
            "num_decoder_layers": num_decoder_layers,
            "ff_dim": ff_dim,
            "num_queries": num_queries,
            "expressive_tokens": expressive_tokens,
        }
        if expressive_tokens < 0:
            raise ValueError(f"expressive_tokens must be >= 0, got {expressive_tokens}")
        self.expressive_tokens = int(expressive_tokens)
        self.num_queries = int(num_queries)
        self.in_proj = nn.Linear(d_llm, width)
        self.queries = nn.Parameter(torch.randn(1, num_queries, width))
        layer: dict[str, Any] = {
            "d_model": width,
            "nhead": num_heads,
            "dim_feedforward": ff_dim,
            "dropout": 0.0,
            "batch_first": True,
            "norm_first": True,
        }
        encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer),
            num_encoder_layers,
            norm=nn.LayerNorm(width),
            enable_nested_tensor=False,  # not available with norm_first; saying so keeps PyTorch quiet
        )
        decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), num_decoder_layers, nn.LayerNorm(width))
        self.transformer = nn.Transformer(
            d_model=width,
            nhead=num_heads,
            dim_feedforward=ff_dim,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
            custom_encoder=encoder,
            custom_decoder=decoder,
        )
        self.out_proj = nn.Linear(width, text_dim)

    def get_config(self) -> dict[str, int]:
        """The keyword arguments that rebuild this head (an exported folder's ``config.json``)."""
        return dict(self._config)

    def forward(self, states: torch.Tensor, token_rows: torch.Tensor) -> torch.Tensor:
        """``states`` (B, r, d_llm) and the visual tokens' embedding rows ((B,) r, d_llm) → (B, Q, text_dim)."""
        hidden = self.in_proj(states + token_rows.to(states.dtype))  # (B, r, width)
        queries = self.queries.expand(states.shape[0], -1, -1).to(hidden.dtype)  # (B, Q, width)
        return self.out_proj(self.transformer(hidden, queries))  # (B, Q, text_dim)


def mgie_stages(groups: tuple[str, ...]) -> dict[int, dict[str, Any]]:
    """MGIE's stages: 1 *align* and 2 *edit* are ours, 3 *full* is the paper's joint training."""
    return {
        1: {
            "name": "align",
            "train": ("mm_embeddings", "lora", "edit_head"),
            "loss_weights": {"llm": 1.0, "align": 1.0},
            "use_unet": False,
            "use_bim": False,
            "learning_rates": dict(LEARNING_RATES),
        },
        2: {
            "name": "edit",
            "train": ("edit_head", "unet"),
            "loss_weights": {"diff": 1.0},
            "use_bim": False,
            "learning_rates": dict(LEARNING_RATES),
        },
        3: {
            "name": "full",
            "train": groups,
            "loss_weights": {"llm": 1.0, "diff": 0.5},  # MGIE: loss_ce + 0.5 * loss_edit
            "use_bim": False,
            "learning_rates": dict(LEARNING_RATES),
        },
    }


class MGIEEditor(Editor):
    """MLLM (expressive instruction + r visual tokens) → edit head (77 queries) → ``f_txt`` → UNet.

    Args:
        comprehension: LLaVA + LoRA + the r visual tokens.
        head: the edit head (its ``d_llm`` is the MLLM's width, its ``text_dim`` the UNet's).
        generation: the UNet without an image branch, with the frozen text encoder (null condition,
            ``L_align``'s target).
    """

    member: ClassVar[str] = "mgie"
    groups: ClassVar[tuple[str, ...]] = ("mm_embeddings", "lora", "edit_head", "unet")
    losses: ClassVar[tuple[str, ...]] = ("llm", "align", "diff")
    optimizer_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "lora": ("mm_embeddings", "lora"),
        "head": ("edit_head",),
        "unet": ("unet",),
    }
    stages: ClassVar[dict[int, dict[str, Any]]] = mgie_stages(groups)

    def __init__(self, comprehension: ComprehensionModel, head: EditHead, generation: EditGenerator) -> None:
        super().__init__()
        if generation.unet.image_embed_dim is not None:
            raise ValueError("MGIE has no image branch: set generation.image_embed_dim to 0")
        text_dim = int(generation.unet.unet.config.cross_attention_dim)
        sizes = head.get_config()
        if sizes["d_llm"] != comprehension.hidden_size or sizes["text_dim"] != text_dim:
            raise ValueError(
                f"the edit head maps {sizes['d_llm']} -> {sizes['text_dim']}, but the MLLM is "
                f"{comprehension.hidden_size} wide and the UNet reads {text_dim}"
            )
        null_length = int(generation.null_f_txt.shape[1])
        if head.num_queries != null_length:
            raise ValueError(f"the edit head has {head.num_queries} queries; the null condition has {null_length}")
        self.comprehension = comprehension
        self.head = head
        self.generation = generation

    # ---------------------------------------------------------------------------------- structure
    @property
    def mllm(self) -> ComprehensionModel:
        """LLaVA with the visual tokens."""
        return self.comprehension

    def understanding_modules(self) -> list[nn.Module]:
        """The MLLM and the edit head."""
        return [self.comprehension, self.head]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Visual-token rows, LoRA, the edit head and the UNet."""
        groups: dict[str, list[nn.Parameter]] = dict(self.comprehension.trainable_parameter_groups())
        groups["edit_head"] = list(self.head.parameters())
        groups["unet"] = list(self.generation.unet.parameters())
        return {name: groups[name] for name in self.groups}

    def apply_stage(self, stage: StageSettings) -> None:
        """Nothing switches with the stage (no BIM)."""

    # ------------------------------------------------------------------------------------ compute
    @torch.no_grad()
    def expressive_instructions(self, mllm_source: torch.Tensor, instructions: list[str]) -> list[str]:
        """What the MLLM writes before the visual tokens (greedy, at most ``head.expressive_tokens`` tokens)."""
        return self.comprehension.generate_answers(mllm_source, list(instructions), self.head.expressive_tokens)

    def conditions(
        self, batch: dict[str, Any], latent_size: tuple[int, int], losses: frozenset[str] = frozenset()
    ) -> EditConditions:
        """``f_txt`` from the edit head; ``llm`` and ``align`` on request.

        The expressive instruction is the batch's ``plain_instruction`` when it has one (training),
        else what the MLLM writes (:meth:`expressive_instructions`).
        """
        instructions = list(batch["instruction"])
        pixels = batch["mllm_source"]
        explicit = batch.get("plain_instruction")
        if explicit is None:
            explicit = self.expressive_instructions(pixels, instructions)
        understood = self.comprehension(
            pixels, instructions, compute_loss="llm" in losses, answers=list(explicit), return_mm_rows=True
        )
        weight = next(self.head.parameters())
        states = understood.h.to(weight.dtype)  # (B, r, d_llm)
        rows = understood.mm_rows  # (B, r, d_llm), the visual tokens' embeddings, read inside the MLLM's forward
        if rows is None:  # a stand-in MLLM (shape-only planning) gives none: the parameter is whole there
            rows = self.comprehension.input_rows.new_rows
        f_txt = self.head(states, rows)  # (B, 77, D_txt)
        aux: dict[str, torch.Tensor] = {}
        if "llm" in losses:
            assert understood.loss_llm is not None
            aux["llm"] = understood.loss_llm
        if "align" in losses:
            target = self.generation.encode_text(list(explicit)).detach()  # (B, 77, D_txt)
            aux["align"] = F.mse_loss(f_txt.float(), target.float())
        return EditConditions(f_txt, aux=aux)


def build_mgie(
    preset: str = "tiny",
    comprehension: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    head: dict[str, Any] | None = None,
) -> MGIEEditor:
    """Build MGIE of ``preset`` from its config sections.

    ``comprehension``: :func:`~insightedit.models.comprehension.presets.build_comprehension`'s arguments
    (``num_mm_tokens`` defaults to MGIE's 8). ``generation``: :class:`EditGenerator`'s (no image
    branch). ``head``: :class:`EditHead`'s sizes and ``expressive_tokens`` over the preset's
    (:data:`HEAD_PRESETS`); its input and output widths are read from the built MLLM and UNet.
    """
    if preset not in HEAD_PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(HEAD_PRESETS)}")
    head_args = dict(head or {})
    unknown = sorted(set(head_args) - set(HEAD_PRESETS[preset]))
    if unknown:
        raise UserError(f"mgie: unknown head settings {unknown}; known: {sorted(HEAD_PRESETS[preset])}")
    generation_args = dict(generation or {})
    if generation_args.get("image_embed_dim"):
        raise UserError("mgie has no image branch: remove generation.image_embed_dim")
    generation_args["image_embed_dim"] = 0
    mllm = build_comprehension(preset=preset, **{"num_mm_tokens": NUM_VISUAL_TOKENS, **(comprehension or {})})
    generator = EditGenerator(preset=preset, **generation_args)
    # on meta only for a shapes-only build: an MLLM on meta whose weights come at the load step has a real head
    shapes_only = next(mllm.parameters()).is_meta and not mllm.pretrained_pending
    with torch.device("meta") if shapes_only else nullcontext():
        edit_head = EditHead(
            d_llm=mllm.hidden_size,
            text_dim=int(generator.unet.unet.config.cross_attention_dim),
            **{**HEAD_PRESETS[preset], **head_args},
        )
    return MGIEEditor(mllm, edit_head, generator)


__all__ = ["HEAD_PRESETS", "EditHead", "MGIEEditor", "build_mgie", "mgie_stages"]
