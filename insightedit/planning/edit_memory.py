"""Peak accelerator memory of one edit (``insightedit plan --edit``), for any member of the zoo, with no weights.

One row per precision (fp16, bf16), MLLM (16, 4 or 8 bit; members with an MLLM) and memory mode of the pipeline:
``full`` (everything resident), ``low`` (MLLM + bridge, then UNet + VAE) and ``sequential`` (``low`` with
the 16-bit MLLM streamed from CPU memory a block at a time; no 4-/8-bit row: that mode refuses them).

Method (printed with every plan):
- weights in the edit's dtype (2 bytes for fp16 and bf16 alike); with the 4-bit MLLM the language
  model's frozen linear weights take :data:`NF4_BYTES` (NF4 with double quantization), with the 8-bit
  MLLM (LLM.int8) :data:`INT8_BYTES` (int8 values; per-row scales not counted), the vision tower,
  projector, embeddings and head stay 16 bit. "bridge" is whatever else the member runs before the UNet
  (its ``understanding_modules()``: Q-Former, BIM and Mapper; an edit head; InstructPix2Pix's text encoder).
  Not on the accelerator at edit time: the CLIP image tower that supervised the IAA Mapper (unused at
  inference) and, for members that do not read it, the text encoder (only its null condition is kept);
- activations without autograd, *counted*: the UNet (the three guidance branches as one batch of 3 at the
  latent size, reading the member's own conditions), the VAE encoder and decoder (one image), and the
  member's conditions (``Editor.conditions``, the MLLM and text encoder by shape) run on the ``meta`` device under
  a dispatch mode that adds each new tensor's bytes when it is made and subtracts them when it is freed;
  attention is taken to be a fused kernel (SDPA flash / memory-efficient), which keeps no score matrix;
- the MLLM's forward cannot run on ``meta`` (LLaVA scatters image features by a data-dependent mask), so
  its activations are a formula: the KV cache transformers keeps for the one forward (2·L·s·h), the
  vision tower's hidden states (all layers, which LLaVA asks for) and one layer's transients (4·s·h + 3·s·f);
- the peak is the largest phase: full mode, everything resident plus the largest activation; low mode,
  the larger of (MLLM + bridge + their activations) and (UNet + VAE + theirs), plus the 4-/8-bit MLLM in the
  second phase too, since bitsandbytes weights stay on the accelerator; sequential mode, the same with
  the MLLM replaced by its largest streamed block (the blocks the offload hooks load whole, listed from the
  built model by the rule accelerate applies: for LLaVA-7B one LLaMA decoder layer with its LoRA), an upper
  bound since that block's weights and the whole forward's activation peak need not coincide;
- moved per edit and its time: weights copied between CPU and accelerator memory in one edit (low: every
  part there and back, a 4-/8-bit MLLM excepted; sequential: every MLLM block that runs, one way, output head
  excluded, plus bridge, UNet and VAE there and back) at an assumed :data:`PCIE_BYTES_PER_S` (PCIe 4.0 x16
  from pinned memory): an estimate of the added seconds, not a measurement.
Not included: the CUDA context (~0.3–0.5 GiB), allocator fragmentation, the MLLM's 4-bit dequantization
buffers (one layer's weights in 16 bit, ~0.2 GiB for LLaVA-7B), buffers the offload keeps resident (KB).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from insightedit.pipeline.offload import offload_blocks
from insightedit.planning.inventory import count_modules, part_of
from insightedit.planning.memory import GIB, NF4_BYTES

TEXT_TOKENS = 64  # instruction + chat template tokens, as the training plan assumes
# the phase group of each part of the parameter table; other parts the member runs before the UNet: "bridge"
GROUPS = {
    "lora": "mllm",
    "mm_embeddings": "mllm",
    "llava": "mllm",
    "unet": "unet",
    "image_branch": "unet",
    "vae": "vae",
}
TRAINING_ONLY_PARTS = ("clip_image_encoder",)  # the IAA target's CLIP tower: supervises the Mapper, unused in an edit
GOAL_GIB = 8.0
INT8_BYTES = 1.0  # LLM.int8: one byte a weight (its fp32 scale per output row: ~0.1%, not counted)
PCIE_BYTES_PER_S = 25e9  # host-to-device copy rate assumed for the transfer estimate
MODES = ("full", "low", "sequential")


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensors made inside the mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Run ``func``; count every fresh (non-view, non-input) output until it is freed."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs and not tensor._is_view():
                size = tensor.numel() * tensor.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, size)
        return out


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """What a fused SDPA kernel allocates: the output only."""
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@contextmanager
def _fused_sdpa() -> Iterator[None]:
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]


def peak_activation_bytes(forward: Callable[[], object]) -> int:
    """Peak bytes of the tensors ``forward`` makes (on ``meta``: nothing is allocated)."""
    mode = LiveBytes()
    with torch.no_grad(), _fused_sdpa(), mode:
        forward()
    return mode.peak


@dataclass
class EditMemory:
    """Bytes per part and phase of one edit in one setting."""

    dtype: str
    four_bit: bool
    memory_mode: str  # full | low | sequential
    weights: dict[str, int]
    activations: dict[str, int]
    largest_block: int = 0  # bytes of the largest MLLM block the sequential mode streams
    streamed: int = 0  # bytes of the MLLM blocks that run in an edit (what the stream copies)
    eight_bit: bool = False  # the MLLM's language model in LLM.int8 (``--8bit``)

    @property
    def quantization(self) -> str | None:
        """``"4bit"``, ``"8bit"`` or ``None`` (16-bit MLLM), as ``EditPipeline``'s ``quantization``."""
        return "4bit" if self.four_bit else "8bit" if self.eight_bit else None

    @property
    def low_memory(self) -> bool:
        """Whether only one phase's parts are on the accelerator at a time (low or sequential)."""
        return self.memory_mode != "full"

    @property
    def mllm_on_accelerator(self) -> int:
        """The MLLM bytes on the accelerator at once: all of it, or its largest block when streamed."""
        return self.largest_block if self.memory_mode == "sequential" else self.weights["mllm"]

    @property
    def peak(self) -> int:
        """Peak bytes on the accelerator."""
        w, a = self.weights, self.activations
        if self.memory_mode == "full":
            return sum(w.values()) + max(a.values())
        understand = self.mllm_on_accelerator + w["bridge"] + max(a["mllm"], a["bridge"])
        stays = w["mllm"] if (self.quantization and self.memory_mode == "low") else 0  # bitsandbytes weights stay
        generate = stays + w["unet"] + w["vae"] + max(a["unet"], a["vae"])
        return max(understand, generate)

    @property
    def moved(self) -> int:
        """Bytes copied between CPU and accelerator memory per edit (see the method)."""
        w = self.weights
        if self.memory_mode == "full":
            return 0
        swapped = 2 * (w["bridge"] + w["unet"] + w["vae"])
        if self.memory_mode == "sequential":
            return swapped + self.streamed
        return swapped + (0 if self.quantization else 2 * w["mllm"])

    def as_dict(self) -> dict[str, Any]:
        """Plain data, in GiB (``moved_gb_per_edit`` in GB, 10⁹ bytes, as bandwidth is quoted)."""
        return {
            "dtype": self.dtype,
            "four_bit_mllm": self.four_bit,
            "quantization": self.quantization,
            "memory_mode": self.memory_mode,
            "low_memory": self.low_memory,
            "weights_gib": {k: round(v / GIB, 3) for k, v in self.weights.items()},
            "activations_gib": {k: round(v / GIB, 3) for k, v in self.activations.items()},
            "mllm_on_accelerator_gib": round(self.mllm_on_accelerator / GIB, 3),
            "largest_mllm_block_bytes": self.largest_block,
            "peak_bytes": self.peak,
            "peak_gib": round(self.peak / GIB, 2),
            "fits_8_gb": self.peak / 1e9 <= GOAL_GIB,
            "moved_gb_per_edit": round(self.moved / 1e9, 2),
            "transfer_s_estimate": round(self.moved / PCIE_BYTES_PER_S, 2),
        }


def _editor(system: Any) -> Any:
    """The editor of an ``EditorSystem``, or ``system`` itself when it is an editor."""
    return getattr(system, "editor", system)


def weight_bytes(system: Any, four_bit: bool, eight_bit: bool = False) -> dict[str, int]:
    """Bytes of the weights an edit puts on the accelerator, per phase group, in 16 bit (or NF4, or int8).

    Groups: ``mllm`` (the MLLM with its LoRA and token rows), ``bridge`` (what else the member runs before
    the UNet: :meth:`~insightedit.models.editor.Editor.understanding_modules`, less the training-only
    :data:`TRAINING_ONLY_PARTS`), ``unet`` (with its image branch) and ``vae``.
    """
    editor = _editor(system)
    understanding = {id(p) for module in editor.understanding_modules() for p in module.parameters()}
    counts = count_modules(editor)
    quantized = counts["llava"].frozen_16bit_linear if ((four_bit or eight_bit) and "llava" in counts) else 0
    result = {"mllm": quantized * (NF4_BYTES if four_bit else INT8_BYTES), "bridge": 0.0, "unet": 0.0, "vae": 0.0}
    for name, parameter in editor.named_parameters():
        part = part_of(name)
        group = GROUPS.get(part)
        if group is None and id(parameter) in understanding and part not in TRAINING_ONLY_PARTS:
            group = "bridge"
        if group is not None:
            result[group] += parameter.numel() * 2
    result["mllm"] -= quantized * 2  # those weights are NF4, counted above
    return {group: int(value) for group, value in result.items()}


def streamed_block_bytes(system: Any, bytes_per_value: int = 2) -> tuple[int, int]:
    """(largest block, all blocks that run) of the MLLM's sequential offload, in bytes at ``bytes_per_value``.

    The blocks are :func:`insightedit.pipeline.offload.offload_blocks` of the MLLM (works on ``meta``); the
    output head's blocks never run in an edit (only the hidden states are read). ``(0, 0)`` without an MLLM.
    """
    mllm = _editor(system).mllm
    if mllm is None:
        return 0, 0
    head = mllm.base_model.get_output_embeddings()
    in_head = {id(module) for module in head.modules()} if head is not None else set()
    sizes = [block.num_params() * bytes_per_value for block in offload_blocks(mllm) if id(block.module) not in in_head]
    return max(sizes), sum(sizes)


def mllm_activation_bytes(system: Any, bytes_per_value: int = 2) -> int:
    """The MLLM's inference activations by formula (KV cache, vision hidden states, one layer's transients)."""
    mllm = _editor(system).mllm
    if mllm is None:
        return 0
    config = mllm.base_model.config
    text, vision = config.text_config, config.vision_config
    patches = mllm.vision_grid[0] * mllm.vision_grid[1]
    sequence = patches + TEXT_TOKENS + mllm.num_mm_tokens
    heads, kv_heads = int(text.num_attention_heads), int(getattr(text, "num_key_value_heads", text.num_attention_heads))
    kv_width = int(text.hidden_size) * kv_heads // heads
    kv_cache = 2 * int(text.num_hidden_layers) * sequence * kv_width
    vision_states = (int(vision.num_hidden_layers) + 1) * (patches + 1) * int(vision.hidden_size)
    transients = 4 * sequence * int(text.hidden_size) + 3 * sequence * int(text.intermediate_size)
    return (kv_cache + vision_states + transients) * bytes_per_value


def _conditions_on_meta(editor: Any, resolution: int, latent: tuple[int, int], dtype: torch.dtype) -> Any:
    """The member's conditions for one edit on ``meta`` (MLLM and text encoder by shape), and their peak bytes."""
    from insightedit.planning.meta_forward import example_batch, shared_modules_by_shape

    batch = example_batch(editor, 1, resolution)
    result: list[Any] = []
    batch = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with shared_modules_by_shape(editor):
        peak = peak_activation_bytes(lambda: result.append(editor.conditions(batch, latent)))
    return result[0].to(torch.device("meta"), dtype), peak


def counted_activations(system: Any, resolution: int, dtype: torch.dtype) -> dict[str, int]:
    """UNet (batch 3), VAE and ``bridge`` (the conditions) activations on ``meta`` at ``resolution``², in ``dtype``.

    The UNet reads the conditions the member computes (their shapes: ``f_txt``, ``f_img``, ``v_txt``).
    """
    editor = _editor(system)
    editor.to(device="meta", dtype=dtype)  # the edit's dtype throughout; nothing is allocated on meta
    generation = editor.generation
    down = int(generation.latent_space.downsample)
    latent = (resolution // down, resolution // down)
    conditions, bridge = _conditions_on_meta(editor, resolution, latent, dtype)
    unet = generation.unet

    def three(value: torch.Tensor | None) -> torch.Tensor | None:  # the three guidance branches as one batch
        return None if value is None else value.expand(3, *value.shape[1:])

    with torch.device("meta"):
        noisy = torch.empty(3, unet.latent_channels, *latent, dtype=dtype)
        image = torch.empty(1, 3, resolution, resolution, dtype=dtype)
        timestep = torch.tensor(500)
    f_txt, embeds, v_txt = three(conditions.f_txt), three(conditions.image_embeds), three(conditions.v_txt)
    parts = {
        "unet": peak_activation_bytes(lambda: unet(noisy, noisy, timestep, f_txt, image_embeds=embeds, v_txt=v_txt)),
        "bridge": bridge,
    }
    vae = getattr(generation.latent_space, "vae", None)
    if vae is not None:
        encode = peak_activation_bytes(lambda: vae.encode(image))
        decode = peak_activation_bytes(lambda: vae.decode(noisy[:1]))
        parts["vae"] = max(encode, decode)
    else:
        parts["vae"] = 0
    return parts


def plan_edit_memory(system: Any, resolution: int = 512) -> list[EditMemory]:
    """Peak edit memory for fp16 and bf16, 16-, 4- or 8-bit MLLM, in each memory mode (no sequential 4-/8-bit).

    Members without an MLLM get no 4-/8-bit rows and no sequential rows (nothing to quantize or stream).
    """
    activations = counted_activations(system, resolution, torch.float16)
    activations["mllm"] = mllm_activation_bytes(system)
    largest, streamed = streamed_block_bytes(system)
    has_mllm = _editor(system).mllm is not None
    rows = []
    for dtype in ("float16", "bfloat16"):
        for bits in (None, "4bit", "8bit") if has_mllm else (None,):
            four_bit, eight_bit = bits == "4bit", bits == "8bit"
            weights = weight_bytes(system, four_bit, eight_bit)
            for mode in MODES:
                if (bits or not has_mllm) and mode == "sequential":
                    continue
                rows.append(EditMemory(dtype, four_bit, mode, weights, dict(activations), largest, streamed, eight_bit))
    return rows


def format_edit_plan(rows: list[EditMemory], resolution: int, width: int = 100) -> str:
    """A table of the edit-memory plan; fp16 and bf16 (same bytes) share one row, the method wrapped to ``width``."""
    import textwrap

    shown = {(r.quantization, r.memory_mode): r for r in rows}  # fp16 and bf16 rows are equal: 2 bytes a value
    lines = [
        f"edit memory at {resolution}x{resolution}, batch 1, GiB on the accelerator "
        f"(MLLM: its weights there at once; moved: GB copied per edit, ≈s at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s)",
        "fp16 and bf16 take the same bytes (2 per value), so one row stands for both",
        f"{'LLM bits':<10} {'memory':<10} {'MLLM':>6} {'bridge':>6} {'UNet':>6} {'VAE':>6} "
        f"{'act max':>7} {'peak':>6} {'fits 8 GB':>9} {'moved':>6} {'≈s':>5}",
    ]
    for row in shown.values():
        d = row.as_dict()
        w, a = d["weights_gib"], d["activations_gib"]
        lines.append(
            f"{(row.quantization or '16bit').replace('bit', '-bit'):<10} {row.memory_mode:<10} "
            f"{d['mllm_on_accelerator_gib']:>6.2f} {w['bridge']:>6.2f} {w['unet']:>6.2f} {w['vae']:>6.2f} "
            f"{max(a.values()):>7.2f} {d['peak_gib']:>6.2f} {'yes' if d['fits_8_gb'] else 'no':>9} "
            f"{d['moved_gb_per_edit']:>6.1f} {d['transfer_s_estimate']:>5.2f}"
        )
    first = rows[0]
    a = first.as_dict()["activations_gib"]
    lines.append("activations (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in a.items()))
    if first.largest_block:  # members with an MLLM
        lines.append(
            f"sequential: MLLM {first.weights['mllm'] / GIB:.2f} GiB in CPU memory, largest streamed block "
            f"{first.largest_block / GIB:.3f} GiB ({first.largest_block:,} bytes), "
            f"{first.streamed / 1e9:.1f} GB streamed per edit"
        )
    lines.append("method:")
    method = (__doc__ or "").split("Method (printed with every plan):")[1]
    method, _, left_out = method.partition("Not included:")
    for item in method.strip().split("\n- ") + [f"not included: {left_out.strip()}"]:
        text = " ".join(line.strip() for line in item.splitlines()).removeprefix("- ").replace("``", "")
        text = text.replace(":data:`", "").replace(":meth:`", "").replace("`", "")
        lines += textwrap.wrap(text, width=width, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines)
