"""``InsightEditPipeline``: image(s) + instruction(s) → edited image(s), diffusers-style.

Per edit the MLLM, the Q-Former, the BIM and the IAA Mapper run once; then the generation module's own
sampler (:meth:`GenerationModule.edit`, dual classifier-free guidance with the three branches in one
batched UNet call per step) makes the edit, so whatever parameterisation the generation module was
trained with is honoured here.

Memory modes (``memory_mode``): ``"full"`` keeps everything on the accelerator; ``"low"`` keeps only one
half there at a time: the MLLM and bridge while the conditions are computed, the UNet and VAE while they
are used; ``"sequential"`` is ``"low"`` with the MLLM's weights left in CPU memory and streamed to the
accelerator one block (decoder layer, vision layer...) at a time while it runs
(:mod:`insightedit.pipeline.offload`, accelerate's hooks).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from insightedit.errors import UserError
from insightedit.models.bridging.model import BridgeOutput, BridgingModel
from insightedit.models.bridging.presets import BridgingSizes, preset_sizes
from insightedit.models.comprehension.model import ComprehensionModel, ComprehensionOutput
from insightedit.pipeline import folder as fmt
from insightedit.pipeline.images import ImageInput, mllm_view, resize, split_images, to_pil, working_size
from insightedit.pipeline.offload import SequentialOffload
from insightedit.pipeline.settings import make_scheduler, resolve_device, resolve_dtype
from insightedit.systems.generation import GenerationModule

if TYPE_CHECKING:
    from insightedit.systems.insightedit import InsightEditSystem

SIZE_KEYS = ("d_llm", "d_vision", "text_dim", "unet_in_width", "clip_dim")
MemoryMode = Literal["full", "low", "sequential"]
MEMORY_MODES: tuple[str, ...] = ("full", "low", "sequential")


def resolve_memory_mode(memory_mode: str | None, low_memory: bool = False) -> MemoryMode:
    """``memory_mode`` checked, or from the older flag: ``low_memory=True`` is ``"low"``, else ``"full"``."""
    if memory_mode is None:
        return "low" if low_memory else "full"
    if memory_mode not in MEMORY_MODES:
        raise UserError(f"unknown memory mode {memory_mode!r}; choose one of {', '.join(MEMORY_MODES)}")
    if low_memory and memory_mode == "full":
        raise UserError("low_memory=True contradicts memory_mode='full'")
    return cast(MemoryMode, memory_mode)


def is_4bit(comprehension: ComprehensionModel) -> bool:
    """Whether the MLLM's language model was loaded in 4 bit (bitsandbytes)."""
    return bool(getattr(comprehension.base_model, "is_loaded_in_4bit", False))


@dataclass
class EditOutput:
    """The edited images (PIL, or (3, H, W) tensors in [0, 1]) and seconds spent per phase."""

    images: list[Any]
    timings: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class InsightEditPipeline:
    """Instruction-based image editing with a trained InsightEdit model.

    Args:
        comprehension: LLaVA + LoRA + [MM] tokens.
        bridging: Q-Former + BIM + IAA Mapper.
        generation: the editing UNet, its latent space, schedule and null text condition.
        bridge_sizes: the bridge's sizes and query count (needed to save it).
        preset: ``"tiny"`` or ``"full"`` (recorded in the saved folder).
        resolution: default working resolution (about ``resolution``² pixels; ``None``: the source's size).
        low_memory: the older switch for ``memory_mode="low"``.
        memory_mode: ``"full"``, ``"low"`` or ``"sequential"`` (see the module docstring and
            :meth:`set_memory_mode`); ``None``: ``"low"`` if ``low_memory`` else ``"full"``.
    """

    def __init__(
        self,
        comprehension: ComprehensionModel,
        bridging: BridgingModel,
        generation: GenerationModule,
        bridge_sizes: tuple[BridgingSizes, int],
        preset: str = "tiny",
        resolution: int | None = None,
        low_memory: bool = False,
        memory_mode: MemoryMode | None = None,
    ) -> None:
        self.comprehension = comprehension.requires_grad_(False).eval()
        self.bridging = bridging.requires_grad_(False).eval()
        self.generation = generation.requires_grad_(False).eval()
        self.bridge_sizes = bridge_sizes
        self.preset = preset
        self.resolution = resolution
        null = cast(torch.Tensor, self.generation.null_f_txt)
        self.device: torch.device = null.device
        self.dtype: torch.dtype = null.dtype
        self.timings: dict[str, float] = {}
        self.memory_mode: MemoryMode = "full"
        self.offload: SequentialOffload | None = None
        self.set_memory_mode(resolve_memory_mode(memory_mode, low_memory))

    # ------------------------------------------------------------------------------ build and save
    @classmethod
    def from_system(cls, system: InsightEditSystem, resolution: int | None = None) -> InsightEditPipeline:
        """A pipeline sharing the modules of an :class:`InsightEditSystem` (no copy)."""
        mllm, unet = system.comprehension.model, system.generation.unet
        args: dict[str, Any] = {
            "d_llm": mllm.hidden_size,
            "d_vision": mllm.vision_hidden_size,
            "text_dim": int(unet.unet.config.cross_attention_dim),
            "unet_in_width": int(unet.unet.config.block_out_channels[0]),
            "clip_dim": unet.image_embed_dim,
            **(system.hparams.get("bridging") or {}),
        }
        sizes = preset_sizes(system.hparams["preset"], **{key: args.get(key) for key in SIZE_KEYS})
        bridge_sizes = (sizes, int(args.get("num_queries", 77)))
        preset = str(system.hparams["preset"])
        return cls(mllm, system.bridging.model, system.generation, bridge_sizes, preset, resolution)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        quantization: str | None = None,
        low_memory: bool = False,
        memory_mode: MemoryMode | None = None,
    ) -> InsightEditPipeline:
        """Load a folder written by :meth:`save_pretrained` / ``insightedit export``.

        ``device``/``dtype`` default to the best available (bf16 or fp16 on a GPU, fp32 on the CPU);
        ``quantization="4bit"`` loads the MLLM's language model in NF4 (bitsandbytes); ``memory_mode``
        (or ``low_memory=True`` for ``"low"``) as in the class docstring; ``"sequential"`` needs the
        16-bit MLLM (no ``quantization``).
        """
        directory = Path(directory)
        mode = resolve_memory_mode(memory_mode, low_memory)
        if mode == "sequential" and quantization:
            raise UserError("the sequential memory mode streams 16-bit weights; with a 4-bit MLLM use 'low'")
        index = fmt.read_model_index(directory)
        target = resolve_device(device)
        precision = resolve_dtype(dtype, target)
        home = torch.device("cpu") if mode != "full" else target
        try:
            with fmt.quiet_progress():
                comprehension = fmt.load_comprehension(
                    directory, index["comprehension"], target if quantization else home, precision, quantization
                )
                bridging = fmt.load_bridging(directory, home, precision)
                generation = fmt.load_generation(directory, target, precision)
                config = fmt.read_bridge_config(directory)
        except UserError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"model folder {directory} is unreadable: {first}") from error
        sizes = (BridgingSizes(**config["sizes"]), int(config["num_queries"]))
        preset = str(index.get("preset", "tiny"))
        return cls(comprehension, bridging, generation, sizes, preset, index.get("resolution"), memory_mode=mode)

    def save_pretrained(self, directory: str | Path, base: str | None = None) -> Path:
        """Write the self-contained folder (see :mod:`insightedit.pipeline.folder`).

        ``base``: a hub id or folder of the frozen LLaVA to reference instead of copying it (full size);
        ``None`` includes the base weights.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        mode = self.memory_mode
        if mode == "sequential":
            self.set_memory_mode("low")  # the real weights back in the modules while they are written
        try:
            return self._save(directory, base)
        finally:
            self.set_memory_mode(mode)

    def _save(self, directory: Path, base: str | None) -> Path:
        with fmt.quiet_progress():
            parts = {
                "comprehension": fmt.save_comprehension(self.comprehension, directory / "comprehension", base),
                "bridging": fmt.save_bridging(self.bridging, *self.bridge_sizes, directory / "bridging"),
                "generation": {"folder": "generation"},
            }
            self.generation.save_pretrained(directory / "generation")
        fmt.write_model_index(directory, self.preset, self.resolution, parts)
        return directory

    # ----------------------------------------------------------------------------------- placement
    @property
    def low_memory(self) -> bool:
        """Whether only one half of the model is on the accelerator at a time (``"low"`` or ``"sequential"``)."""
        return self.memory_mode != "full"

    def set_memory_mode(self, mode: MemoryMode) -> None:
        """Switch between ``"full"``, ``"low"`` and ``"sequential"`` (see the module docstring).

        ``"sequential"`` moves the MLLM to the CPU and installs the offload hooks (its parameters are then
        ``meta`` tensors between forwards, the real ones held by the hooks); leaving it removes every hook
        and puts the real weights back in the modules (on the CPU; the next edit places them as the new
        mode says). ``"full"`` moves every part to the pipeline's device now.
        """
        mode = resolve_memory_mode(mode)
        if mode == self.memory_mode and (mode != "sequential" or self.offload is not None):
            return
        if mode == "sequential" and is_4bit(self.comprehension):
            raise UserError("the sequential memory mode streams 16-bit weights; with a 4-bit MLLM use 'low'")
        if self.offload is not None:
            self.offload.remove()
            self.offload = None
        if mode == "sequential":
            self.comprehension.to("cpu")
            self.offload = SequentialOffload(self.comprehension, self.device)
        elif mode == "full":
            self._move_understanding(self.device)
            self._move_generation(self.device)
        self.memory_mode = mode

    @property
    def size_multiple(self) -> int:
        """Pixel sizes the UNet accepts: latent downsampling × 2 per UNet downsampling block."""
        config = self.generation.unet.unet.config
        return int(self.generation.latent_space.downsample) * 2 ** (len(config.block_out_channels) - 1)

    def _move_generation(self, device: torch.device) -> None:
        self.generation.unet.to(device)
        if isinstance(self.generation.latent_space, nn.Module):
            self.generation.latent_space.to(device)
        self.generation.null_f_txt = self.generation.null_f_txt.to(device)

    def _move_understanding(self, device: torch.device) -> None:
        self.bridging.to(device)
        if self.offload is not None:
            return  # the hooks bring each block of the MLLM to the device while it runs
        if is_4bit(self.comprehension) and device.type == "cpu":
            return  # bitsandbytes 4-bit weights stay where they were loaded
        self.comprehension.to(device)

    def _place(self, phase: str) -> None:
        """Low and sequential modes: ``phase``'s parts (understand | generate) to the device, the others to CPU."""
        if not self.low_memory or self.device.type == "cpu":
            return
        cpu = torch.device("cpu")
        if phase == "understand":
            self._move_generation(cpu)
            self._move_understanding(self.device)
        else:
            self._move_understanding(cpu)
            self._move_generation(self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -------------------------------------------------------------------------------------- stages
    @torch.no_grad()
    def understand(self, images: list[torch.Tensor], instructions: list[str]) -> ComprehensionOutput:
        """The MLLM's ``h`` (B, r, d_llm) and patch features for unit images (3, H, W) and instructions."""
        size = self.comprehension.image_size
        device = self.device if self.offload is not None else next(self.comprehension.parameters()).device
        pixels = torch.stack([mllm_view(image, size) for image in images]).to(device)  # (B, 3, S, S)
        return self.comprehension(pixels, instructions, compute_loss=False)

    @torch.no_grad()
    def bridge(self, understood: ComprehensionOutput, latent_size: tuple[int, int]) -> BridgeOutput:
        """The UNet's conditions (``f_txt``, ``v_txt``, ``image_embeds``) at ``latent_size``."""
        weight = next(self.bridging.parameters())
        h = understood.h.to(device=weight.device, dtype=weight.dtype)
        vision = understood.vision_features.to(device=weight.device, dtype=weight.dtype)
        return self.bridging(h, vision, self.comprehension.vision_grid, latent_size)

    def base_scheduler(self) -> SchedulerMixin:
        """The generation module's sampling schedule (DDIM on its training schedule)."""
        make = getattr(self.generation, "sampling_scheduler", None)
        return make() if make is not None else DDIMScheduler.from_config(self.generation.noise_scheduler.config)

    # ---------------------------------------------------------------------------------------- edit
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        instruction: str | Sequence[str],
        image_scale: float | None = None,
        text_guidance: float = 7.5,
        image_guidance: float = 1.5,
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        scheduler: str | SchedulerMixin = "ddim",
        resolution: int | None = None,
        output_type: str = "pil",
    ) -> EditOutput:
        """Edit ``image`` (PIL or (3, H, W) / (B, 3, H, W) tensors in [0, 1]) as ``instruction`` says.

        Args:
            image_scale: λ, the IAA image branch's weight (``None``: the model's own).
            text_guidance, image_guidance: s_T and s_I of dual classifier-free guidance.
            generator: a ``torch.Generator`` (or one per image); ``seed`` makes one.
            scheduler: ``"ddim"``, ``"euler_a"``, ``"dpm++"`` or a diffusers scheduler instance.
            resolution: working size ≈ ``resolution``² pixels (default: the model's); output is at source size.
            output_type: ``"pil"`` or ``"pt"`` ((3, H, W) tensors in [0, 1]).
        """
        images = split_images(image)  # type: ignore[arg-type]
        instructions = [instruction] if isinstance(instruction, str) else list(instruction)
        if len(instructions) == 1 and len(images) > 1:
            instructions = instructions * len(images)
        if len(images) == 1 and len(instructions) > 1:
            images = images * len(instructions)
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        if any(not isinstance(text, str) or not text.strip() for text in instructions):
            raise ValueError("every instruction must be a non-empty string")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        resolution = self.resolution if resolution is None else resolution
        unet = self.generation.unet
        previous_scale = unet.image_scale
        if image_scale is not None:
            unet.image_scale = image_scale
        try:
            return self._edit(
                images,
                instructions,
                text_guidance,
                image_guidance,
                num_inference_steps,
                generator,
                scheduler,
                resolution,
                output_type,
            )
        finally:
            unet.image_scale = previous_scale

    def _edit(
        self,
        images: list[torch.Tensor],
        instructions: list[str],
        text_guidance: float,
        image_guidance: float,
        num_inference_steps: int,
        generator: torch.Generator | list[torch.Generator] | None,
        scheduler: str | SchedulerMixin,
        resolution: int | None,
        output_type: str,
    ) -> EditOutput:
        start = time.perf_counter()
        self._place("understand")
        understood = self.understand(images, instructions)
        _sync(self.device)
        understood_at = time.perf_counter()
        sizes = [working_size(int(im.shape[1]), int(im.shape[2]), self.size_multiple, resolution) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size, []).append(index)
        down = int(self.generation.latent_space.downsample)
        conditions: dict[tuple[int, int], BridgeOutput] = {}
        for size, members in groups.items():
            part = ComprehensionOutput(understood.h[members], understood.vision_features[members], None)
            conditions[size] = self.bridge(part, (size[0] // down, size[1] // down))
        _sync(self.device)
        bridged_at = time.perf_counter()
        self._place("generate")
        outputs: list[Any] = [None] * len(images)
        for size, members in groups.items():
            bridge = conditions[size]
            source = resize(torch.stack([images[i] for i in members]), size) * 2 - 1  # (b, 3, h, w) in [-1, 1]
            to = {"device": self.device, "dtype": self.dtype}
            edited = self.generation.edit(
                source.to(**to),
                f_txt=bridge.f_txt.to(**to),
                image_embeds=bridge.image_embeds.to(**to),
                v_txt=bridge.v_txt.to(**to) if bridge.v_txt is not None else None,
                text_guidance=text_guidance,
                image_guidance=image_guidance,
                num_inference_steps=num_inference_steps,
                generator=[generator[i] for i in members] if isinstance(generator, list) else generator,
                scheduler=make_scheduler(self.base_scheduler(), scheduler),
            )
            for row, i in enumerate(members):
                back = resize(edited[row : row + 1].float(), tuple(images[i].shape[-2:]))[0]
                unit = ((back + 1) / 2).clamp(0, 1).cpu()
                outputs[i] = to_pil(unit) if output_type == "pil" else unit
        _sync(self.device)
        end = time.perf_counter()
        self.timings = {
            "understand": understood_at - start,
            "bridge": bridged_at - understood_at,
            "generate": end - bridged_at,
            "total": end - start,
        }
        return EditOutput(outputs, dict(self.timings))


__all__ = ["MEMORY_MODES", "EditOutput", "InsightEditPipeline", "MemoryMode", "resolve_memory_mode"]
