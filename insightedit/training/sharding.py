"""FSDP2 sharding of any member of the zoo, and the Lightning strategy that trains and checkpoints it.

Under Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` (or :class:`FSDP2Strategy`,
its subclass here), :meth:`EditorSystem.configure_model` calls :func:`shard_system`, which applies
PyTorch's ``fully_shard`` (FSDP2: every parameter becomes a ``DTensor`` sharded on dim 0 over the
data-parallel mesh) bottom-up. What is sharded is found by the kind of module, never by the member:

1. **blocks**: every transformers ``GradientCheckpointingLayer`` (the LLaMA decoder layers, the CLIP
   encoder layers of LLaVA's vision tower and of the SD text encoder, the Q-Former layers), open_clip's
   ``ResidualAttentionBlock`` (the IAA target's CLIP tower), PyTorch's transformer encoder and decoder
   layers (MGIE's edit head) and each UNet's down, mid and up blocks; optionally with activation
   checkpointing (``torch.distributed._composable.checkpoint``, which keeps parameter names, so
   checkpoints match non-sharded runs);
2. **units**: the shared modules (the MLLM with its embeddings, projector, norms and token rows; the
   editing UNet with its conv in/out and time embedding; its image projection; the VAE; the text encoder;
   the CLIP image encoder; the Q-Former, BIM and IAA Mapper), then every part of the editor (a direct
   child of the :class:`~insightedit.models.editor.Editor`, e.g. MGIE's edit head) that still holds
   parameters of its own;
3. **the root**: the system itself (whatever is left, and FSDP2's lazy initialisation).

FSDP2 gathers a unit's parameters only in its ``forward``; methods the system calls on a unit outside
``forward`` are registered with ``register_fsdp_forward_method`` (see ``_unit_types``), and so are
the system's own entry points (``training_step``, ``edit``...), since Lightning never calls the root's
``forward``. Frozen and trainable parameters share units: FSDP2 keeps ``requires_grad`` per parameter
and reduce-scatters only the gradients that exist. bitsandbytes 4-/8-bit weights cannot be sharded.

:class:`FSDP2Strategy` changes two things of ``ModelParallelStrategy``: ``data_parallel_size="auto"``
means every process (so the same config runs on any number of nodes), and checkpoints gather only what
the module saves (``saved_names()``: the trained weights, never the frozen 7B base), as one full file
(``save_distributed_checkpoint: false``) or as a ``torch.distributed.checkpoint`` folder that holds only
those weights and still resumes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from insightedit.errors import UserError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROOT_FORWARD_METHODS = ("training_step", "validation_step", "test_step", "predict_step", "edit")
_CHECKPOINTED = "_insightedit_activation_checkpointed"


@dataclass
class ShardingSettings:
    """How :func:`shard_system` shards (the system's ``sharding:`` config section).

    Args:
        activation_checkpointing: recompute each block's activations in the backward pass (blocks the
            models already checkpoint themselves, ``gradient_checkpointing: true``, are left alone).
        reshard_after_forward: free each block's gathered parameters after its forward (gather again
            for backward: less memory, more communication; ``False`` is ZeRO-2-like).
        param_dtype: dtype the gathered parameters compute in: ``"auto"`` (bfloat16 when the trainer's
            precision is ``bf16-*``, else the parameters' own), ``"bfloat16"``, ``"float16"``,
            ``"float32"`` or ``None`` (the parameters' own).
        reduce_dtype: dtype gradients are reduce-scattered in (``None``: ``param_dtype``).
        load_after_sharding: under the CLI, build without the pretrained weights, shard, then load them
            into the shards, read by rank 0 only (:mod:`insightedit.training.sharded_loading`); ``False``:
            every rank reads them all before sharding (host memory at start grows with the ranks).
    """

    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    param_dtype: str | None = "auto"
    reduce_dtype: str | None = "float32"
    load_after_sharding: bool = True

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            allowed = (*DTYPES, "auto") if name == "param_dtype" else tuple(DTYPES)
            if value is not None and value not in allowed:
                raise ValueError(f"sharding.{name} must be one of {allowed} or null, got {value!r}")

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> ShardingSettings:
        """Settings from a config section; unknown keys are an error that names the known ones."""
        config = dict(config or {})
        unknown = set(config) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"unknown sharding settings {sorted(unknown)}; known: {sorted(asdict(cls()))}")
        return cls(**config)

    def mixed_precision(self, precision: str) -> MixedPrecisionPolicy:
        """FSDP2's policy for a trainer ``precision`` (``"bf16-mixed"`` -> gather in bf16, reduce in fp32)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param_dtype = self.param_dtype
        if param_dtype == "auto":
            param_dtype = "bfloat16" if str(precision).startswith("bf16") else None
        reduce_dtype = self.reduce_dtype if param_dtype is not None else None
        return MixedPrecisionPolicy(
            param_dtype=DTYPES[param_dtype] if param_dtype else None,
            reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None,
        )


# ------------------------------------------------------------------------------------------- plan
def _unit_types() -> dict[type[nn.Module], tuple[str, ...]]:
    """The system's parts sharded as one unit each, with the methods called on them outside ``forward``."""
    from diffusers.models.embeddings import ImageProjection

    from insightedit.models.bridging.bim import BidirectionalInteraction
    from insightedit.models.bridging.iaa import ClipImageEncoder, Mapper
    from insightedit.models.bridging.qformer import QFormerBridge
    from insightedit.models.comprehension.model import ComprehensionModel
    from insightedit.models.generation.edit_unet import EditUNet
    from insightedit.models.generation.latent_space import VaeLatentSpace
    from insightedit.models.text_encoder import FrozenTextEncoder

    return {
        ComprehensionModel: ("generate_answers",),  # MGIE writes its expressive instruction before the edit
        EditUNet: (),
        # its own unit: the sampler calls EditUNet.project_image_embeds outside the UNet's forward, and a
        # method registered on EditUNet would reshard the UNet when the forward itself calls it
        ImageProjection: (),
        VaeLatentSpace: ("encode_target", "encode_source", "decode"),
        FrozenTextEncoder: (),
        ClipImageEncoder: ("encode_image",),
        QFormerBridge: (),
        BidirectionalInteraction: (),
        Mapper: (),
    }


def sharded_blocks(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The per-layer blocks of ``root`` that get their own FSDP2 unit (and activation checkpointing)."""
    from diffusers import UNet2DConditionModel
    from open_clip.transformer import ResidualAttentionBlock
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch_layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    layers = (GradientCheckpointingLayer, ResidualAttentionBlock, *torch_layers)
    for name, module in root.named_modules():
        if isinstance(module, layers):
            yield name, module
        elif isinstance(module, UNet2DConditionModel):
            unet: Any = module  # diffusers builds these attributes in __init__ (untyped)
            prefix = f"{name}." if name else ""
            for attribute in ("down_blocks", "up_blocks"):
                for index, block in enumerate(getattr(unet, attribute)):
                    yield f"{prefix}{attribute}.{index}", block
            if unet.mid_block is not None:
                yield f"{prefix}mid_block", unet.mid_block


def sharded_units(root: nn.Module) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """(name, module, non-forward methods) of every unit, deepest first, so children shard before parents.

    Units are the shared modules of ``_unit_types`` and every part of an editor (a direct child of an
    :class:`~insightedit.models.editor.Editor`) left with parameters that no block or shared unit holds.
    """
    from insightedit.models.editor import Editor

    types = _unit_types()
    units: list[tuple[str, nn.Module, tuple[str, ...]]] = []
    for name, module in root.named_modules():
        methods = [methods for kind, methods in types.items() if isinstance(module, kind)]
        if methods:
            units.append((name, module, tuple(m for m in methods[0] if hasattr(module, m))))
    covered = {id(p) for _, unit, _ in units for p in unit.parameters()}
    covered |= {id(p) for _, block in sharded_blocks(root) for p in block.parameters()}
    for name, module in root.named_modules():
        if isinstance(module, Editor):
            for child, part in module.named_children():
                if any(id(p) not in covered for p in part.parameters()):
                    units.append((f"{name}.{child}" if name else child, part, ()))
    return sorted(units, key=lambda unit: -unit[0].count("."))


def check_shardable(root: nn.Module) -> None:
    """Raise one clear :class:`UserError` if ``root`` holds quantized (bitsandbytes) weights."""
    for name, parameter in root.named_parameters():
        kind = type(parameter).__name__
        if kind in ("Params4bit", "Int8Params") or parameter.dtype in (torch.uint8, torch.int8):
            raise UserError(
                f"FSDP2 cannot shard a 4-/8-bit (bitsandbytes) model ({name} is {kind}, {parameter.dtype}): "
                "set model.init_args.comprehension.quantization to null for sharded training, or train the "
                "quantized model on one device (lightning_configs/qlora_1gpu.yaml)"
            )


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _checkpoint_activations(module: nn.Module) -> bool:
    """Composable activation checkpointing (names unchanged) unless the module already checkpoints itself."""
    from torch.distributed._composable import checkpoint

    if getattr(module, _CHECKPOINTED, False) or getattr(module, "gradient_checkpointing", False):
        return False
    checkpoint(module)
    setattr(module, _CHECKPOINTED, True)
    return True


def register_forward_methods(module: nn.Module, names: tuple[str, ...]) -> None:
    """``register_fsdp_forward_method`` for each of ``names``; a call nested in another one runs unhooked.

    FSDP2 gathers the module's parameters before a registered method and (unless it is the root)
    frees them after it; a registered method called by another one (``test_step`` -> ``edit``) must
    not free them while the outer one still runs, so only the outermost call is hooked.
    """
    import functools

    from torch.distributed.fsdp import register_fsdp_forward_method

    depth = [0]
    for name in names:
        unhooked = getattr(module, name)
        register_fsdp_forward_method(module, name)
        hooked = getattr(module, name)

        def method(*args: Any, _hooked: Any = hooked, _unhooked: Any = unhooked, **kwargs: Any) -> Any:
            if depth[0]:
                return _unhooked(*args, **kwargs)
            depth[0] += 1
            try:
                return _hooked(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(module, name, functools.wraps(unhooked)(method))


def shard_system(
    system: nn.Module, mesh: DeviceMesh, settings: ShardingSettings, precision: str = "32-true"
) -> dict[str, int]:
    """Apply FSDP2 to ``system`` (blocks, then units, then the root) over ``mesh``; return what was done.

    Idempotent: a system whose root is already sharded is left as it is. The counts returned are
    ``{"blocks", "units", "checkpointed", "parameters"}`` (``parameters``: how many are now DTensors).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    counts = {"blocks": 0, "units": 0, "checkpointed": 0}
    # these return views (h, the Q-Former's output) that nothing modifies in place
    warnings.filterwarnings(
        "ignore", message=r"FSDP2-wrapped module \(FSDP(ComprehensionModel|QFormerBridge)\) returned a view"
    )
    if not is_sharded(system):
        check_shardable(system)
        policy = settings.mixed_precision(precision)
        options: dict[str, Any] = {"mesh": mesh, "mp_policy": policy}
        for _, block in list(sharded_blocks(system)):
            if settings.activation_checkpointing:
                counts["checkpointed"] += _checkpoint_activations(block)
            if not is_sharded(block):
                fully_shard(block, reshard_after_forward=settings.reshard_after_forward, **options)
                counts["blocks"] += 1
        for _, unit, methods in sharded_units(system):
            if not is_sharded(unit):
                fully_shard(unit, reshard_after_forward=settings.reshard_after_forward, **options)
                counts["units"] += 1
            register_forward_methods(unit, methods)
        # the root's inputs are the batch: keep its targets in full precision (units cast their own inputs)
        root_policy = MixedPrecisionPolicy(
            param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype, cast_forward_inputs=False
        )
        fully_shard(system, mesh=mesh, mp_policy=root_policy)
        register_forward_methods(system, tuple(m for m in ROOT_FORWARD_METHODS if hasattr(system, m)))
    counts["parameters"] = sum(isinstance(p, DTensor) for p in system.parameters())
    return counts


# ----------------------------------------------------------------------------------------- strategy
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) with checkpoints of the trained weights only.

    Args:
        data_parallel_size: processes that shard the model; ``"auto"``: every process (world size /
            ``tensor_parallel_size``), so one config runs on 8 GPUs or on ``N`` nodes of 8.
        tensor_parallel_size: 1 (the zoo's systems apply no tensor parallelism).
        save_distributed_checkpoint: ``False``: ``last.ckpt`` is one file, gathered on rank 0;
            ``True``: a folder of per-rank shards (``torch.distributed.checkpoint``) plus ``meta.pt``.
            Either holds only what the module's ``saved_names()`` keeps.
        process_group_backend, timeout: as for ``ModelParallelStrategy`` (gloo on CPUs, NCCL on GPUs).
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )

    @property
    def save_distributed_checkpoint(self) -> bool:
        """Whether checkpoints are folders of shards rather than one gathered file."""
        return bool(self._save_distributed_checkpoint)

    def resolved_data_parallel_size(self) -> Literal["auto"] | int:
        """``data_parallel_size``, with ``"auto"`` as world size / tensor-parallel size (when that is set)."""
        if self._data_parallel_size == "auto" and isinstance(self._tensor_parallel_size, int):
            return max(self.num_nodes * self.num_processes // self._tensor_parallel_size, 1)
        return self._data_parallel_size

    def setup_environment(self) -> None:
        """Resolve ``data_parallel_size="auto"``, then set up processes and the device mesh as Lightning does."""
        self._data_parallel_size = self.resolved_data_parallel_size()
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's ``saved_names()`` entries: gathered on rank 0 (one file) or as shards (a folder).

        Modules without ``saved_names`` get ``ModelParallelStrategy``'s whole state dict.
        """
        from torch.distributed.tensor import DTensor

        module = self.lightning_module
        saved_names = getattr(module, "saved_names", None)
        if saved_names is None:
            return super().lightning_module_state_dict()
        keep = saved_names()
        assert self.model is not None
        selected = {name: value for name, value in self.model.state_dict().items() if name in keep}
        if self._save_distributed_checkpoint:
            return selected
        gathered: dict[str, Any] = {}
        for name, value in selected.items():  # the same order on every rank: full_tensor() is a collective
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if self.global_rank == 0:
                gathered[name] = full.detach().cpu()
        return gathered

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a full file (as ``ModelParallelStrategy``) or a folder that may hold only some weights."""
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        return self._load_partial_distributed_checkpoint(path, weights_only)

    def _load_partial_distributed_checkpoint(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        """Read the weights the folder has (every rank its shards), the optimizer states, and ``meta.pt``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        assert self.model is not None and self.lightning_module is not None
        stored = {
            key.removeprefix("state_dict.")
            for key in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
            if key.startswith("state_dict.")
        }
        model_state = {name: v for name, v in get_model_state_dict(self.model).items() if name in stored}
        missing = sorted(name for name, p in self.model.named_parameters() if p.requires_grad and name not in stored)
        if missing and self.lightning_module.strict_loading:
            raise UserError(f"checkpoint {path} lacks {len(missing)} trained weights, e.g. {missing[:3]}")
        dcp.load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[key])
        return torch.load(path / _METADATA_FILENAME, weights_only=True)  # never code from the file


def load_distributed_checkpoint(folder: Path) -> dict[str, Any]:
    """A ``save_distributed_checkpoint: true`` folder as one checkpoint dict, in this process (CPU)."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(folder)


__all__ = [
    "FSDP2Strategy",
    "ShardingSettings",
    "check_shardable",
    "is_sharded",
    "load_distributed_checkpoint",
    "shard_system",
    "sharded_blocks",
    "sharded_units",
]
