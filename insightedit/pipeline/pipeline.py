"""``EditPipeline``: image(s) + instruction(s) → edited image(s) with any member of the zoo, diffusers-style.

The pipeline holds one :class:`~insightedit.models.editor.Editor` and uses only its interface: per edit
the member's :meth:`Editor.conditions` run once per working size (InstructPix2Pix's text encoder; an
MLLM and its bridge or edit head), then :meth:`Editor.generate` samples with the member's own generator
(dual classifier-free guidance, three branches in one batched UNet call per step), so whatever
parameterisation it was trained with is honoured here. λ (``image_scale``) only matters for members
whose UNet has an image branch.

Memory modes (``memory_mode``): ``"full"`` keeps every part that runs on the accelerator; ``"low"``
keeps only one half there at a time: the member's :meth:`Editor.understanding_modules` while the
conditions are computed, the UNet and latent space while they are used; ``"sequential"`` is ``"low"``
with the MLLM's weights left in CPU memory and streamed to the accelerator one block (decoder layer,
vision layer...) at a time while it runs (:mod:`insightedit.pipeline.offload`, accelerate's hooks). A
member without an MLLM has nothing to stream: its ``"sequential"`` is its ``"low"``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from insightedit.errors import UserError
from insightedit.models.editor import EditConditions, Editor
from insightedit.models.generation.generator import EditGenerator
from insightedit.models.zoo import get_member
from insightedit.pipeline import folder as fmt
from insightedit.pipeline.images import ImageInput, mllm_view, resize, split_images, to_pil, working_size
from insightedit.pipeline.offload import SequentialOffload
from insightedit.pipeline.parts import load_part, part_kind, save_part
from insightedit.pipeline.settings import make_scheduler, resolve_device, resolve_dtype
from insightedit.threads import cpu_call_threads

MemoryMode = Literal["full", "low", "sequential"]
MEMORY_MODES: tuple[str, ...] = ("full", "low", "sequential")
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError)


def resolve_memory_mode(memory_mode: str | None, low_memory: bool = False) -> MemoryMode:
    """``memory_mode`` checked, or from the older flag: ``low_memory=True`` is ``"low"``, else ``"full"``."""
    if memory_mode is None:
        return "low" if low_memory else "full"
    if memory_mode not in MEMORY_MODES:
        raise UserError(f"unknown memory mode {memory_mode!r}; choose one of {', '.join(MEMORY_MODES)}")
    if low_memory and memory_mode == "full":
        raise UserError("low_memory=True contradicts memory_mode='full'")
    return cast(MemoryMode, memory_mode)


def is_4bit(module: nn.Module | None) -> bool:
    """Whether ``module`` (an MLLM) holds a language model in 4 or 8 bit (bitsandbytes: it stays where loaded)."""
    base = getattr(module, "base_model", None)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


class HoldsEditor(Protocol):
    """What :meth:`EditPipeline.from_system` reads of a training system: its editor and hyperparameters."""

    editor: Editor
    hparams: Any


@dataclass
class EditOutput:
    """The edited images (PIL, or (3, H, W) tensors in [0, 1]) and seconds spent per phase."""

    images: list[Any]
    timings: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EditPipeline:
    """Instruction-based image editing with a trained member of the zoo.

    Args:
        editor: the member's :class:`Editor` (its parts are shared, not copied).
        preset: ``"tiny"`` or ``"full"`` (recorded in the saved folder).
        resolution: default working resolution (about ``resolution``² pixels; ``None``: the source's size).
        low_memory: the older switch for ``memory_mode="low"``.
        memory_mode: ``"full"``, ``"low"`` or ``"sequential"`` (see the module docstring and
            :meth:`set_memory_mode`); ``None``: ``"low"`` if ``low_memory`` else ``"full"``.
        device, dtype: where and in which precision the edit runs (default: the UNet's).
    """

    def __init__(
        self,
        editor: Editor,
        preset: str = "tiny",
        resolution: int | None = None,
        low_memory: bool = False,
        memory_mode: MemoryMode | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.editor = editor.eval()
        self.preset = preset
        self.resolution = resolution
        reference = next(editor.generation.unet.parameters())
        self.device: torch.device = torch.device(device) if device is not None else reference.device
        self.dtype: torch.dtype = dtype if dtype is not None else reference.dtype
        self.timings: dict[str, float] = {}
        self.memory_mode: MemoryMode | None = None
        self.offload: SequentialOffload | None = None
        self.set_memory_mode(resolve_memory_mode(memory_mode, low_memory))

    # ------------------------------------------------------------------------------ what it holds
    @property
    def member(self) -> str:
        """The member's name in the zoo."""
        return self.editor.member

    @property
    def generation(self) -> EditGenerator:
        """The member's generator (UNet, latent space, schedule, null text condition)."""
        return self.editor.generation

    @property
    def mllm(self) -> nn.Module | None:
        """The member's MLLM, if it has one."""
        return self.editor.mllm

    @property
    def has_image_branch(self) -> bool:
        """Whether λ (``image_scale``) changes anything: the UNet has an image branch."""
        return self.generation.unet.image_embed_dim is not None

    # ------------------------------------------------------------------------------ build and save
    @classmethod
    def from_system(cls, system: HoldsEditor, resolution: int | None = None) -> EditPipeline:
        """A pipeline sharing the editor of a training system (:class:`EditorSystem`; no copy)."""
        return cls(system.editor, str(system.hparams.get("preset", "tiny")), resolution)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        quantization: str | None = None,
        low_memory: bool = False,
        memory_mode: MemoryMode | None = None,
    ) -> EditPipeline:
        """Load a folder written by :meth:`save_pretrained` / ``insightedit export`` (any member).

        ``device``/``dtype`` default to the best available (bf16 or fp16 on a GPU, fp32 on the CPU);
        ``quantization="4bit"`` loads the MLLM's language model in NF4, ``"8bit"`` in LLM.int8 (bitsandbytes;
        members with an MLLM only); ``memory_mode`` (or ``low_memory=True`` for ``"low"``) as in the class docstring;
        ``"sequential"`` needs the 16-bit MLLM (no ``quantization``).
        """
        directory = Path(directory)
        mode = resolve_memory_mode(memory_mode, low_memory)
        if mode == "sequential" and quantization:
            raise UserError("the sequential memory mode streams 16-bit weights; with a 4-/8-bit MLLM use 'low'")
        index = fmt.read_model_index(directory)
        member = get_member(str(index["member"]))
        entries: dict[str, dict[str, Any]] = index["parts"]
        if quantization and not any(entry["kind"] == "comprehension" for entry in entries.values()):
            bits = str(quantization).replace("bit", "-bit")  # "4-bit", "8-bit"
            raise UserError(f"{bits} quantization applies to an MLLM; member {member.name} has none")
        target = resolve_device(device)
        precision = resolve_dtype(dtype, target)
        try:
            editor_class = member.editor_class()
        except ImportError:
            raise UserError(f"member {member.name} is not available in this insightedit") from None
        try:
            with fmt.quiet_progress():
                parts = {
                    name: load_part(directory, entry, precision, quantization, str(target))
                    for name, entry in entries.items()
                }
                editor = editor_class.from_parts(parts, **index["options"])
        except UserError:
            raise
        except LOAD_ERRORS as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"model folder {directory} is unreadable: {first}") from error
        preset = str(index.get("preset", "tiny"))
        return cls(editor, preset, index.get("resolution"), memory_mode=mode, device=target, dtype=precision)

    def save_pretrained(self, directory: str | Path, base: str | None = None) -> Path:
        """Write the self-contained folder (see :mod:`insightedit.pipeline.folder`).

        ``base``: a hub id or folder of the frozen LLaVA to reference instead of copying it (full size;
        members with an MLLM); ``None`` includes the base weights.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        mode = self.memory_mode
        if self.offload is not None:
            self.set_memory_mode("low")  # the real weights back in the modules while they are written
        try:
            return self._save(directory, base)
        finally:
            if mode is not None:
                self.set_memory_mode(mode)

    def _save(self, directory: Path, base: str | None) -> Path:
        entries: dict[str, dict[str, Any]] = {}
        with fmt.quiet_progress():
            for name, part in self.editor.parts().items():
                entries[name] = save_part(part_kind(part), part, directory, name, base)
        options = self.editor.options()
        fmt.write_model_index(directory, self.member, self.preset, self.resolution, options, entries)
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
        mode says). ``"full"`` moves every part that runs to the pipeline's device now. A member without
        an MLLM installs no hooks: its ``"sequential"`` is ``"low"``.
        """
        mode = resolve_memory_mode(mode)
        mllm = self.editor.mllm
        streams = mode == "sequential" and mllm is not None
        if mode == self.memory_mode and (not streams or self.offload is not None):
            return
        if streams and is_4bit(mllm):
            raise UserError("the sequential memory mode streams 16-bit weights; with a 4-/8-bit MLLM use 'low'")
        if self.offload is not None:
            self.offload.remove()
            self.offload = None
        if streams:
            assert mllm is not None
            mllm.to("cpu")
            self.offload = SequentialOffload(mllm, self.device)
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
        """The UNet, the latent space and the null text condition (what sampling uses)."""
        generation = self.generation
        generation.unet.to(device)
        if isinstance(generation.latent_space, nn.Module):
            generation.latent_space.to(device)
        generation.null_f_txt = generation.null_f_txt.to(device)

    def _move_understanding(self, device: torch.device) -> None:
        """The member's understanding modules; a streamed or 4-bit MLLM stays where it is."""
        mllm = self.editor.mllm
        for module in self.editor.understanding_modules():
            if module is mllm and (self.offload is not None or is_4bit(mllm)):
                continue  # the hooks bring each block to the device; bitsandbytes' weights stay where loaded
            module.to(device)

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
    def conditions(
        self, images: list[torch.Tensor], instructions: list[str], latent_size: tuple[int, int]
    ) -> EditConditions:
        """The member's conditions for unit images (3, H, W) and instructions at ``latent_size``.

        Members that read the image with an MLLM get its view (short side to its size, centre crop,
        CLIP-normalised) as ``mllm_source``.
        """
        batch: dict[str, Any] = {"instruction": list(instructions)}
        if self.editor.needs_mllm_view():
            size = self.editor.mllm_image_size()
            batch["mllm_source"] = torch.stack([mllm_view(image, size) for image in images]).to(self.device)
        return self.editor.conditions(batch, latent_size)

    def base_scheduler(self) -> SchedulerMixin:
        """The generator's sampling schedule (DDIM on its training schedule)."""
        return self.generation.sampling_scheduler()

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
            image_scale: λ, the image branch's weight (``None``: the model's own; ignored by members
                without an image branch).
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
        sampling = {
            "text_guidance": text_guidance,
            "image_guidance": image_guidance,
            "num_inference_steps": num_inference_steps,
        }
        resolution = self.resolution if resolution is None else resolution
        with cpu_call_threads(self.device.type):  # no spinning thread team on shared cores (insightedit/threads.py)
            return self._edit(
                images, instructions, image_scale, sampling, generator, scheduler, resolution, output_type
            )

    def _edit(
        self,
        images: list[torch.Tensor],
        instructions: list[str],
        image_scale: float | None,
        sampling: dict[str, Any],
        generator: torch.Generator | list[torch.Generator] | None,
        scheduler: str | SchedulerMixin,
        resolution: int | None,
        output_type: str,
    ) -> EditOutput:
        start = time.perf_counter()
        sizes = [working_size(int(im.shape[1]), int(im.shape[2]), self.size_multiple, resolution) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size, []).append(index)
        down = int(self.generation.latent_space.downsample)
        self._place("understand")
        conditions: dict[tuple[int, int], EditConditions] = {}
        for size, rows in groups.items():
            latent_size = (size[0] // down, size[1] // down)
            conditions[size] = self.conditions([images[i] for i in rows], [instructions[i] for i in rows], latent_size)
        _sync(self.device)
        understood_at = time.perf_counter()
        self._place("generate")
        outputs: list[Any] = [None] * len(images)
        for size, rows in groups.items():
            source = resize(torch.stack([images[i] for i in rows]), size) * 2 - 1  # (b, 3, h, w) in [-1, 1]
            edited = self.editor.generate(
                source.to(device=self.device, dtype=self.dtype),
                conditions[size].to(self.device, self.dtype),
                image_scale=image_scale,
                generator=[generator[i] for i in rows] if isinstance(generator, list) else generator,
                scheduler=make_scheduler(self.base_scheduler(), scheduler),
                **sampling,
            )
            for row, i in enumerate(rows):
                back = resize(edited[row : row + 1].float(), tuple(images[i].shape[-2:]))[0]
                unit = ((back + 1) / 2).clamp(0, 1).cpu()
                outputs[i] = to_pil(unit) if output_type == "pil" else unit
        _sync(self.device)
        end = time.perf_counter()
        self.timings = {"understand": understood_at - start, "generate": end - understood_at, "total": end - start}
        return EditOutput(outputs, dict(self.timings))


InsightEditPipeline = EditPipeline  # the name used before the zoo

__all__ = [
    "MEMORY_MODES",
    "EditOutput",
    "EditPipeline",
    "InsightEditPipeline",
    "MemoryMode",
    "is_4bit",
    "resolve_memory_mode",
]
