"""Memory per device for a training stage: weights, gradients, optimizer state, activations.

Stated assumptions (printed with every plan):
- mixed precision (``bf16-mixed``/``16-mixed``) keeps trainable weights, their gradients and AdamW's two
  moments in float32 (4 + 4 + 8 bytes per trainable parameter); ``*-true`` precisions keep all in 16 bit;
- the frozen LLM is stored in its load ``dtype`` (2 bytes for bfloat16), or quantized: 4-bit NF4 with
  double quantization is 0.516 bytes per linear weight, 8-bit 1 byte; the other frozen parts (CLIP, VAE,
  text encoder) stay in float32 unless the precision is ``*-true`` 16 bit;
- FSDP full shard divides weights, gradients and optimizer state by the world size and holds two
  gathered units (the largest layer, in the compute dtype) at a time; DDP replicates everything and adds
  one gradient bucket copy of the trainable gradients;
- activations as described in :mod:`insightedit.planning.activations`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from insightedit.planning.inventory import ModuleCount

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values + 8-bit absmax per 64 + fp32 per 256 absmax
GATHER_UNITS = ("LlamaDecoderLayer", "CLIPEncoderLayer", "BasicTransformerBlock", "ResnetBlock2D")


@dataclass
class PlanSettings:
    """The parts of a config that decide memory."""

    precision: str = "32-true"
    strategy: str = "auto"  # auto (one device), ddp, fsdp
    devices: int = 1
    num_nodes: int = 1
    batch_size: int = 1
    resolution: int = 256
    quantization: str | None = None
    llm_dtype: str | None = None
    llm_checkpointing: bool = False
    unet_checkpointing: bool = False

    @property
    def world_size(self) -> int:
        """Processes in the run."""
        return max(self.devices, 1) * max(self.num_nodes, 1)

    @property
    def half_compute(self) -> bool:
        """Activations in 16 bit."""
        return self.precision.startswith(("bf16", "16"))

    @property
    def all_half(self) -> bool:
        """Weights and optimizer state in 16 bit too (``*-true``)."""
        return self.half_compute and self.precision.endswith("true")


@dataclass
class MemoryPlan:
    """Estimated bytes per device, by kind, with the method behind each number."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    gather_buffer: int
    settings: PlanSettings
    activation_parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Sum of every kind."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.gather_buffer

    def as_dict(self) -> dict[str, object]:
        """Plain data in bytes and GiB."""
        kinds = ("weights", "gradients", "optimizer", "activations", "gather_buffer", "total")
        values = {kind: getattr(self, kind) for kind in kinds}
        return {
            "bytes_per_device": values,
            "gib_per_device": {k: round(v / GIB, 2) for k, v in values.items()},
            "activation_parts_gib": {k: round(v / GIB, 3) for k, v in self.activation_parts.items()},
            "settings": asdict(self.settings) | {"world_size": self.settings.world_size},
            "notes": self.notes,
        }


def largest_gather_unit(system: nn.Module) -> int:
    """Parameters of the largest layer FSDP gathers at once."""
    sizes = [
        sum(p.numel() for p in module.parameters())
        for module in system.modules()
        if type(module).__name__ in GATHER_UNITS
    ]
    return max(sizes, default=0)


def plan_memory(
    system: nn.Module,
    counts: dict[str, ModuleCount],
    settings: PlanSettings,
    activation_parts: dict[str, int],
) -> MemoryPlan:
    """Combine parameter counts, the settings and activation estimates into bytes per device."""
    half = 2 if settings.all_half else 4
    trainable = sum(c.trainable for c in counts.values())
    weights = float(trainable * half)
    llm_bytes = 2 if (settings.llm_dtype in ("bfloat16", "float16") or settings.all_half) else 4
    for part, count in counts.items():
        frozen = count.params - count.trainable
        if part == "llava":
            quantized = {"4bit": NF4_BYTES, "8bit": 1.0}.get(settings.quantization or "", None)
            if quantized is None:
                weights += frozen * llm_bytes
            else:
                weights += count.frozen_16bit_linear * quantized + (frozen - count.frozen_16bit_linear) * llm_bytes
        else:
            weights += frozen * half
    gradients = trainable * half
    optimizer = trainable * (4 if settings.all_half else 8)
    notes = []
    gather = 0
    strategy = settings.strategy.lower()
    if "fsdp" in strategy:
        world = settings.world_size
        weights, gradients, optimizer = weights / world, gradients / world, optimizer / world
        gather = 2 * largest_gather_unit(system) * (2 if settings.half_compute else 4)
        notes.append(f"FSDP full shard over {world} processes; two gathered units of the largest layer")
    elif "ddp" in strategy:
        gradients *= 2
        notes.append("DDP: every process holds a full replica plus one gradient-bucket copy")
    else:
        notes.append("one device: nothing sharded")
    if settings.quantization and "fsdp" in strategy:
        notes.append("quantized bases are not sharded by FSDP in practice; the sharded figure is optimistic")
    return MemoryPlan(
        weights=int(weights),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=int(sum(activation_parts.values())),
        gather_buffer=int(gather),
        settings=settings,
        activation_parts=activation_parts,
        notes=notes,
    )
