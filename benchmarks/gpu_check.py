"""The prepared GPU check: the full-size system, random weights, bf16, measured against ``insightedit plan``.

One command, unattended, under 8 minutes on one H200 (no network, no hub: every model is built from the
full-size configs with random weights on the GPU and written in the hub repos' on-disk layouts first)::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Parts, each in its own ``try`` (a failure records its error line and the rest still run), each skipped
with a reason when the global time budget (``--budget-s``) has too little left:

- ``folders``: random-weight folders in the real layouts: LLaVA-1.5-7B (transformers: config,
  safetensors, tokenizer), InstructPix2Pix (diffusers: ``model_index.json``, ``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``); the CLIP ViT-L/14 IAA target is built from its
  config. The tokenizers are the project's offline ones (not Llama's or CLIP's vocabulary) with LLaVA's
  ``<image>`` and pad tokens; every width and depth is the real model's.
- ``train_1gpu``: stage 3 with the QLoRA overlay (``lightning_configs/stage3.yaml`` +
  ``qlora_1gpu.yaml``: 4-bit NF4 LLM, bf16-mixed, batch 4 at 256 px), hub ids swapped for the folders,
  through Lightning's ``Trainer``: seconds per step after warm-up (one micro-batch with its optimizer step:
  ``accumulate_grad_batches`` is set to 1, the overlay's 8 multiplies the time of an optimizer step, not the
  memory), ``torch.cuda.max_memory_allocated``/``max_memory_reserved`` beside the plan's total.
- ``train_sharded``: ``stage3.yaml`` + ``fsdp2_8gpu.yaml`` on every GPU (FSDP2), only when
  ``torch.cuda.device_count() > 1`` (``--sharded-ranks N`` forces N processes, e.g. gloo on CPUs).
- ``edit_full``, ``edit_low``, ``edit_sequential``, ``edit_4bit``, ``edit_8bit``: the stage-3 model exported
  (``EditPipeline.save_pretrained``, LLaVA base referenced), loaded with ``EditPipeline.from_pretrained`` in
  each memory mode (16-bit MLLM), and with the MLLM in 4 and 8 bit (memory mode ``full``); one warm-up edit,
  then a timed edit at 512²: seconds per edit, peak allocated/reserved beside ``plan --edit``'s row.
- plans: ``insightedit plan``'s estimates for exactly the configs run (computed in a side process
  while the GPU works).

``--tiny`` runs the same code with the tiny presets on the CPU in float32 (edits at 64 px) in about a
minute: what CI runs (tests/test_gpu_check.py). Results: JSON (``--out``) and a Markdown table beside it,
with provenance (command, commit, date), the GPU's name and the torch/CUDA versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance.py, peak_memory.py beside this file
from peak_memory import PeakRss  # noqa: E402
from provenance import provenance  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "lightning_configs"
GIB = 2**30
INSTRUCTION = "Replace the red circle with a blue square."
CAPTION = "a blue square on a grey background"
EDIT_MODES: dict[str, tuple[str, str | None]] = {  # part -> (memory mode, quantization)
    "edit_full": ("full", None),
    "edit_low": ("low", None),
    "edit_sequential": ("sequential", None),
    "edit_4bit": ("full", "4bit"),
    "edit_8bit": ("full", "8bit"),
}
PARTS = ("folders", "train_1gpu", "train_sharded", *EDIT_MODES)


@dataclass
class Profile:
    """What differs between the real check (``full``, one GPU, bf16) and its CPU rehearsal (``tiny``)."""

    name: str
    device: torch.device
    stage_config: Path
    dtype: torch.dtype  # the 16-bit (or, tiny, 32-bit) dtype of the LLM and of the edits
    resolution: int  # edit resolution
    edit_steps: int
    warmup_steps: int
    timed_steps: int
    needs: dict[str, float]  # rough seconds each part needs; less left in the budget: skipped
    cpu_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def tiny(self) -> bool:
        """Whether this is the CPU rehearsal."""
        return self.name == "tiny"


def make_profile(tiny: bool, resolution: int | None, steps: int | None) -> Profile:
    """The full-size GPU profile, or the tiny CPU one."""
    if tiny:
        return Profile(
            name="tiny",
            device=torch.device("cpu"),
            stage_config=CONFIGS / "tiny" / "stage3.yaml",
            dtype=torch.float32,
            resolution=resolution or 64,
            edit_steps=4,
            warmup_steps=1,
            timed_steps=steps or 2,
            needs=dict.fromkeys(PARTS, 1.0),
            cpu_overrides={"accelerator": "cpu", "precision": "32-true"},
        )
    return Profile(
        name="full",
        device=torch.device("cuda"),
        stage_config=CONFIGS / "stage3.yaml",
        dtype=torch.bfloat16,
        resolution=resolution or 512,
        edit_steps=20,
        warmup_steps=2,
        timed_steps=steps or 4,
        needs={"folders": 60, "train_1gpu": 120, "train_sharded": 150, **dict.fromkeys(EDIT_MODES, 30)},
    )


# ------------------------------------------------------------------------------------------ budget
class OutOfTime(Exception):
    """The global time budget ran out inside a part."""


class Budget:
    """The global time budget: how much is left, and an alarm that stops a part when it is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def left(self) -> float:
        """Seconds left."""
        return self.seconds - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.start

    @contextmanager
    def alarm(self) -> Iterator[None]:
        """Raise :class:`OutOfTime` in this block when the budget is spent (POSIX; checked between Python calls)."""
        if not hasattr(signal, "SIGALRM"):
            yield
            return

        def ring(signum: int, frame: Any) -> None:
            raise OutOfTime(f"time budget of {self.seconds:.0f} s spent")

        previous = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def error_line(error: BaseException) -> str:
    """``Type: first line`` of an exception."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def gib(value: float | int | None) -> float | None:
    """Bytes as GiB, 3 decimals."""
    return None if value is None else round(value / GIB, 3)


# ----------------------------------------------------------------------------------------- devices
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached blocks back, so the next part starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class MemoryMeter:
    """Peak accelerator memory of a block (``max_memory_allocated``/``reserved``), or peak RSS rise on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.result: dict[str, float | None] = {}

    @contextmanager
    def measure(self) -> Iterator[dict[str, float | None]]:
        """Measure the block; the dict it yields is filled on exit."""
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            yield self.result
            synchronize(self.device)
            self.result.update(
                allocated_at_start_gib=gib(before),
                max_allocated_gib=gib(torch.cuda.max_memory_allocated(self.device)),
                max_reserved_gib=gib(torch.cuda.max_memory_reserved(self.device)),
            )
        else:
            with PeakRss() as rss:
                yield self.result
            self.result.update(peak_rss_rise_gib=gib(rss.rise), max_allocated_gib=None, max_reserved_gib=None)


def device_info(profile: Profile) -> dict[str, Any]:
    """The accelerator and the versions that matter for the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "device": str(profile.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{name: installed(name) for name in ("transformers", "diffusers", "lightning", "peft", "bitsandbytes")},
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=gib(properties.total_memory),
            gpu_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(gpu=None, gpu_count=0, cpu=platform.processor() or platform.machine())
    return info


# ----------------------------------------------------------------------------------------- folders
def write_llava_folder(directory: Path, profile: Profile) -> dict[str, Any]:
    """LLaVA-1.5 in transformers' layout with random weights (7B widths and depth, or the tiny twin's).

    The tokenizer is the project's offline one (:mod:`insightedit.models.comprehension.tiny_tokenizer`) with
    LLaVA's ``<image>`` and pad tokens; the config's token ids follow it, the vocabulary rows stay 32,064.
    """
    from transformers import LlavaForConditionalGeneration

    from insightedit.models.comprehension.presets import (
        FULL_TEXT_CONFIG,
        FULL_VISION_CONFIG,
        llava_config,
        tiny_llava_config,
    )
    from insightedit.models.comprehension.prompts import IMAGE_TOKEN
    from insightedit.models.comprehension.tiny_tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    if profile.tiny:
        config = tiny_llava_config(tokenizer)
    else:
        ids = {"pad_token_id": tokenizer.pad_token_id}
        text = {
            **FULL_TEXT_CONFIG,
            **ids,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        image_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))  # type: ignore[arg-type]
        config = llava_config(FULL_VISION_CONFIG, text, image_token_id=image_id, **ids)
    torch.manual_seed(0)
    with torch.device(profile.device):  # random init where it is fast (the GPU), in the dtype it is stored in
        model = LlavaForConditionalGeneration._from_config(config, dtype=profile.dtype)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"llava_params": params}


def write_instruct_pix2pix_folder(directory: Path, profile: Profile, unet_overrides: dict[str, Any]) -> dict[str, Any]:
    """InstructPix2Pix in diffusers' layout with random float32 weights (SD1.5 widths, 8 input channels)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from insightedit.models.generation.presets import (
        FULL_TEXT_CONFIG,
        FULL_UNET_CONFIG,
        FULL_VAE_CONFIG,
        STABLE_DIFFUSION_SCHEDULER,
        TINY_UNET_CONFIG,
    )
    from insightedit.models.text_encoder import tiny_clip_text_config, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(directory / ".tiny-clip-tokenizer")
    torch.manual_seed(0)
    index: dict[str, Any] = {"_class_name": "StableDiffusionInstructPix2PixPipeline", "_diffusers_version": "0.42.1"}
    with torch.device(profile.device):
        unet = UNet2DConditionModel(**{**(TINY_UNET_CONFIG if profile.tiny else FULL_UNET_CONFIG), **unet_overrides})
        if profile.tiny:
            text_encoder = CLIPTextModel(tiny_clip_text_config())
        else:
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
            text_encoder = CLIPTextModel(CLIPTextConfig(**FULL_TEXT_CONFIG, **ids, pad_token_id=tokenizer.eos_token_id))
            vae = AutoencoderKL(**FULL_VAE_CONFIG)
            vae.save_pretrained(str(directory / "vae"))
            index["vae"] = ["diffusers", "AutoencoderKL"]
            del vae
    unet.save_pretrained(str(directory / "unet"))
    text_encoder.save_pretrained(str(directory / "text_encoder"))
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    DDPMScheduler(**STABLE_DIFFUSION_SCHEDULER).save_pretrained(str(directory / "scheduler"))
    shutil.rmtree(directory / ".tiny-clip-tokenizer")
    index.update(
        unet=["diffusers", "UNet2DConditionModel"],
        text_encoder=["transformers", "CLIPTextModel"],
        tokenizer=["transformers", "CLIPTokenizer"],
        scheduler=["diffusers", "DDPMScheduler"],
    )
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    params = sum(p.numel() for p in unet.parameters())
    del unet, text_encoder
    return {"unet_params": params}


# ----------------------------------------------------------------------------------------- configs
def load_configs(paths: list[Path]) -> dict[str, Any]:
    """The yaml files merged left to right, as ``insightedit plan`` (and LightningCLI) merge them."""
    from insightedit.commands.plan import load_config

    return load_config([str(path) for path in paths])


def with_folders(config: dict[str, Any], folders: dict[str, Path], profile: Profile) -> dict[str, Any]:
    """``config`` with the hub ids swapped for the random folders, no previous stage, no downloads; CPU for tiny."""
    config = json.loads(json.dumps(config))
    model = config["model"]["init_args"]
    model["init_from"] = None
    model.setdefault("comprehension", {})["pretrained"] = str(folders["llava"])
    model.setdefault("generation", {})["pretrained"] = str(folders["instruct_pix2pix"])
    model["generation"]["text_encoder"] = None  # the folder's own (the tiny configs name the CLIP foundation's)
    model.setdefault("bridging", {})["clip_pretrained"] = None  # CLIP ViT-L/14 from its config, random
    config.setdefault("trainer", {}).update(profile.cpu_overrides)
    return config


def write_config(config: dict[str, Any], path: Path) -> Path:
    """Write a merged config as yaml (what ``plan --config`` reads); return its path."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------- training
class RandomEdits(torch.utils.data.Dataset):
    """Random pairs with every key a stage-3 step reads, at the config's sizes."""

    def __init__(self, length: int, resolution: int, mllm_size: int, clip_size: int) -> None:
        self.length, self.resolution, self.mllm_size, self.clip_size = length, resolution, mllm_size, clip_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        r, m, c = self.resolution, self.mllm_size, self.clip_size
        return {
            "source": torch.rand(3, r, r, generator=generator) * 2 - 1,
            "target": torch.rand(3, r, r, generator=generator) * 2 - 1,
            "mllm_source": torch.randn(3, m, m, generator=generator),
            "clip_target": torch.randn(3, c, c, generator=generator),
            "instruction": INSTRUCTION,
            "plain_instruction": INSTRUCTION,
            "target_caption": CAPTION,
        }


def _step_timer(device: torch.device) -> Any:
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Seconds of each training step (one batch: forward, backward, clip, optimizer step)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.losses: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            synchronize(device)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            synchronize(device)
            self.seconds.append(time.perf_counter() - self._start)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss.detach().float().cpu()) if isinstance(loss, torch.Tensor) else float("nan"))

    return StepTimer()


def build_system(config: dict[str, Any], device: str | None = None) -> Any:
    """The configured :class:`EditorSystem`; ``device`` places a quantized LLM there (bitsandbytes loads it there)."""
    from insightedit.systems.editor_system import EditorSystem

    init_args = json.loads(json.dumps(config["model"]["init_args"]))
    if device is not None and (init_args.get("comprehension") or {}).get("quantization"):
        init_args["comprehension"]["device"] = device
    return EditorSystem(**init_args)


def make_strategy(trainer_config: dict[str, Any]) -> Any:
    """The config's strategy: a name, or a ``class_path``/``init_args`` mapping built here."""
    import importlib

    strategy = trainer_config.get("strategy", "auto")
    if isinstance(strategy, dict):
        module, _, name = str(strategy["class_path"]).rpartition(".")
        return getattr(importlib.import_module(module), name)(**(strategy.get("init_args") or {}))
    return strategy or "auto"


def train_steps(
    system: Any, config: dict[str, Any], profile: Profile, devices: int, workdir: Path
) -> tuple[dict[str, Any], Any]:
    """Fit ``warmup + timed`` steps of ``system`` with the config's trainer settings; the timings and the trainer."""
    import lightning as L

    trainer_config = config["trainer"]
    data = config["data"]["init_args"]
    batch_size = int(data["batch_size"])
    steps = profile.warmup_steps + profile.timed_steps
    dataset = RandomEdits(
        batch_size * steps * devices,
        int(data["resolution"]),
        int(data.get("mllm_size") or data["resolution"]),
        int(data.get("clip_size") or 224),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    timer = _step_timer(profile.device if devices == 1 else torch.device(profile.device.type))
    trainer = L.Trainer(
        accelerator=trainer_config.get("accelerator", "gpu"),
        devices=devices,
        num_nodes=1,
        strategy=make_strategy(trainer_config),
        precision=trainer_config.get("precision", "32-true"),
        gradient_clip_val=trainer_config.get("gradient_clip_val"),
        accumulate_grad_batches=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
        default_root_dir=str(workdir),
    )
    trainer.fit(system, train_dataloaders=loader)
    timed = timer.seconds[profile.warmup_steps :]
    result = {
        "batch_size_per_device": batch_size,
        "resolution": int(data["resolution"]),
        "precision": trainer_config.get("precision"),
        "accumulate_grad_batches_in_config": trainer_config.get("accumulate_grad_batches", 1),
        "warmup_steps": profile.warmup_steps,
        "timed_steps": len(timed),
        "step_seconds": [round(s, 3) for s in timer.seconds],
        "seconds_per_step": round(statistics.median(timed), 3) if timed else None,
        "losses": [round(loss, 4) for loss in timer.losses],
        "trainable_params": sum(p.numel() for p in system.parameters() if p.requires_grad),
    }
    return result, trainer


# ------------------------------------------------------------------------------------------- plans
def compute_plans(spec: dict[str, Any]) -> dict[str, Any]:
    """``insightedit plan``'s estimates for the configs in ``spec`` (run in a side process; each in its own try)."""
    from insightedit.commands.plan import build_on_meta, make_plan, planned_config
    from insightedit.planning.edit_memory import plan_edit_memory

    plans: dict[str, Any] = {}
    for name, entry in spec["train"].items():
        try:
            plan = make_plan([entry["config"]], devices=entry.get("devices"))
            plans[name] = {"memory": plan["memory"], "total": plan["total"]}
        except Exception as error:  # noqa: BLE001 - recorded, the other plans still come
            plans[name] = {"error": error_line(error)}
    try:
        system, _, _ = build_on_meta(planned_config([spec["edit"]["config"]]).get("model") or {})
        rows = plan_edit_memory(system, int(spec["edit"]["resolution"]))
        plans["edit"] = [
            {"dtype": row.dtype, "four_bit": row.four_bit, "quantization": row.quantization,
             "memory_mode": row.memory_mode, "peak_gib": gib(row.peak)}
            for row in rows
        ]
    except Exception as error:  # noqa: BLE001
        plans["edit"] = {"error": error_line(error)}
    return plans


def edit_estimate(
    plans: dict[str, Any], memory_mode: str, quantization: str | None, dtype: torch.dtype
) -> dict[str, Any]:
    """The plan's peak for one edit setting (16-bit rows are the same for fp16 and bf16; fp32 has none)."""
    rows = plans.get("edit")
    if not isinstance(rows, list):
        return {"plan_peak_gib": None, "plan_note": (rows or {}).get("error", "no edit plan")}
    wanted = "bfloat16" if dtype == torch.float32 else str(dtype).removeprefix("torch.")
    for row in rows:
        if row["dtype"] == wanted and row["quantization"] == quantization and row["memory_mode"] == memory_mode:
            note = "plan counts 16-bit weights; this run is float32" if dtype == torch.float32 else None
            return {"plan_peak_gib": row["peak_gib"], **({"plan_note": note} if note else {})}
    return {"plan_peak_gib": None, "plan_note": f"no plan row for {wanted}, {quantization}, {memory_mode}"}


# --------------------------------------------------------------------------------------------- run
class Check:
    """Runs the parts in order within the budget and keeps the results (written after every part)."""

    def __init__(self, args: argparse.Namespace, profile: Profile) -> None:
        self.args = args
        self.profile = profile
        self.budget = Budget(args.budget_s)
        self.workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.folders = {
            "llava": self.workdir / "llava-1.5-7b-hf",
            "instruct_pix2pix": self.workdir / "instruct-pix2pix",
        }
        self.results: dict[str, Any] = {
            **provenance(),
            "profile": profile.name,
            "budget_s": args.budget_s,
            "system": device_info(profile),
            "parts": {},
        }
        self.plans: dict[str, Any] = {}
        self.plan_process: subprocess.Popen | None = None
        self.trained: Any = None  # the stage-3 system after train_1gpu: exported for the edits
        self.export_dir: Path | None = None
        self.export_error: str | None = None
        self.sharded_ranks = args.sharded_ranks if args.sharded_ranks is not None else torch.cuda.device_count()

    # ---------------------------------------------------------------------------- configs and plans
    def configs(self) -> dict[str, Path]:
        """Write the merged configs of the runs (the plan reads the same files)."""
        base = load_configs([self.profile.stage_config])
        single = load_configs([self.profile.stage_config, CONFIGS / "qlora_1gpu.yaml"])
        sharded = load_configs([self.profile.stage_config, CONFIGS / "fsdp2_8gpu.yaml"])
        sharded["trainer"]["devices"] = max(self.sharded_ranks, 1)
        paths = {
            "train_1gpu": write_config(
                with_folders(single, self.folders, self.profile), self.workdir / "train_1gpu.yaml"
            ),
            "train_sharded": write_config(
                with_folders(sharded, self.folders, self.profile), self.workdir / "sharded.yaml"
            ),
            "edit": write_config(with_folders(base, self.folders, self.profile), self.workdir / "edit.yaml"),
        }
        return paths

    def start_plans(self, paths: dict[str, Path]) -> None:
        """Compute the plans in a side process while the parts run."""
        train = {"train_1gpu": {"config": str(paths["train_1gpu"])}}
        if self.sharded_ranks > 1:
            train["train_sharded"] = {"config": str(paths["train_sharded"]), "devices": self.sharded_ranks}
        spec = {"train": train, "edit": {"config": str(paths["edit"]), "resolution": self.profile.resolution}}
        spec_path = self.workdir / "plan_spec.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, str(Path(__file__).resolve()), "--plans-worker", str(spec_path)]
        command += ["--threads", str(self.args.threads)] if self.args.threads else []
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the plan needs no GPU
        self.plan_log = open(self.workdir / "plans.log", "w")  # noqa: SIM115 - closed in collect_plans
        self.plan_process = subprocess.Popen(command, env=env, stdout=self.plan_log, stderr=subprocess.STDOUT)

    def collect_plans(self) -> None:
        """Wait (within the budget) for the side process; record its plans or why there are none."""
        if self.plan_process is None:
            self.results["plans"] = self.plans
            return
        try:
            self.plan_process.wait(timeout=max(self.budget.left(), 1.0))
        except subprocess.TimeoutExpired:
            self.plan_process.kill()
            self.plan_process.wait()
            self.plans = {"error": "the plan did not finish within the time budget"}
        self.plan_log.close()
        out = self.workdir / "plan_spec.json.out"
        if out.is_file():
            self.plans = json.loads(out.read_text())
        elif not self.plans:
            log = (self.workdir / "plans.log").read_text().strip().splitlines()
            self.plans = {"error": f"the plan process failed: {log[-1] if log else 'no output'}"}
        self.results["plans"] = self.plans

    # -------------------------------------------------------------------------------------- parts
    def run_part(self, name: str, work: Callable[[], dict[str, Any]]) -> None:
        """Run one part under the budget; record its numbers, its skip reason or its error line."""
        need = self.profile.needs.get(name, 0.0)
        left = self.budget.left()
        if name not in self.args.parts:
            entry: dict[str, Any] = {"skipped": "not selected (--parts)"}
        elif left < need:
            entry = {"skipped": f"time budget: {left:.0f} s left, the part needs about {need:.0f} s"}
        else:
            start = time.perf_counter()
            try:
                with self.budget.alarm():
                    entry = work()
            except OutOfTime as error:
                entry = {"skipped": f"{error} during the part"}
            except Exception as error:  # noqa: BLE001 - one part's failure must not lose the others
                entry = {"error": error_line(error)}
                if self.args.verbose:
                    traceback.print_exc()
            entry["wall_seconds"] = round(time.perf_counter() - start, 1)
        free_memory(self.profile.device)
        self.results["parts"][name] = entry
        print(f"[{self.budget.elapsed():6.0f} s] {name}: {summary(entry)}", flush=True)
        self.write()

    def part_folders(self) -> dict[str, Any]:
        """Write the random-weight folders."""
        start = time.perf_counter()
        info = write_llava_folder(self.folders["llava"], self.profile)
        llava_s = time.perf_counter() - start
        overrides = ((load_configs([self.profile.stage_config])["model"]["init_args"].get("generation") or {})
                     .get("unet_config") or {})  # fmt: skip
        info |= write_instruct_pix2pix_folder(self.folders["instruct_pix2pix"], self.profile, overrides)
        sizes = {
            name: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) for name, path in self.folders.items()
        }
        return {**info, "llava_seconds": round(llava_s, 1), "folder_gib": {k: gib(v) for k, v in sizes.items()}}

    def part_train_1gpu(self, config_path: Path) -> dict[str, Any]:
        """Stage 3 + QLoRA on one device: timed steps, peak memory, the plan's total."""
        config = yaml.safe_load(config_path.read_text())
        start = time.perf_counter()
        system = build_system(config, str(self.profile.device) if self.profile.device.type == "cuda" else None)
        build_s = time.perf_counter() - start
        meter = MemoryMeter(self.profile.device)
        with meter.measure():
            result, trainer = train_steps(system, config, self.profile, 1, self.workdir / "train_1gpu")
        system.zero_grad(set_to_none=True)
        system.trainer = None  # let the optimizer's states go before the edits are measured
        del trainer
        self.trained = system
        return {
            "config": ["stage3.yaml", "qlora_1gpu.yaml"],
            "build_seconds": round(build_s, 1),
            **result,
            **meter.result,
        }

    def part_train_sharded(self, config_path: Path) -> dict[str, Any]:
        """Stage 3 + FSDP2 over every device, in a child process that Lightning fans out to the ranks."""
        if self.sharded_ranks < 2:
            return {"skipped": f"{torch.cuda.device_count()} CUDA device(s): sharding needs more than one"}
        out = self.workdir / "sharded.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--sharded-worker", str(config_path), str(out)]
        command += ["--profile", self.profile.name, "--steps", str(self.profile.timed_steps)]
        command += ["--threads", str(self.args.threads)] if self.args.threads else []
        timeout = max(self.budget.left() - 5, 1)
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if completed.returncode != 0 or not out.is_file():
            lines = (completed.stderr or completed.stdout).strip().splitlines()
            errors = [line for line in lines if "Error" in line or "error" in line]
            return {"error": (errors or lines or ["no output"])[-1], "returncode": completed.returncode}
        return {
            "config": ["stage3.yaml", "fsdp2_8gpu.yaml"],
            "ranks": self.sharded_ranks,
            **json.loads(out.read_text()),
        }

    def export(self) -> Path:
        """The stage-3 model as an ``EditPipeline`` folder (the trained one if train_1gpu ran; base referenced)."""
        if self.export_dir is not None:
            return self.export_dir
        if self.export_error is not None:  # tried once for the first edit part; the others say why they cannot run
            raise RuntimeError(f"no exported model ({self.export_error})")
        try:
            return self._export()
        except Exception as error:
            self.export_error = error_line(error)
            raise

    def _export(self) -> Path:
        from insightedit.pipeline.pipeline import EditPipeline

        system = self.trained
        if system is None:  # training did not run: a fresh stage-3 system with a 16-bit LLM
            config = yaml.safe_load((self.workdir / "edit.yaml").read_text())
            system = build_system(config)
        directory = self.workdir / "export"
        # the base is referenced, not copied: it is the random folder itself (LoRA and [MM] rows are saved apart),
        # and a 4-bit base could not be written back in 16 bit
        pipeline = EditPipeline.from_system(system, resolution=self.profile.resolution)
        pipeline.save_pretrained(directory, base=str(self.folders["llava"]))
        self.trained = None
        del system, pipeline
        free_memory(self.profile.device)
        self.export_dir = directory
        return directory

    def part_edit(self, name: str) -> dict[str, Any]:
        """Load the exported model in one memory mode / quantization, edit once to warm up, then time an edit."""
        from insightedit.pipeline.pipeline import EditPipeline

        memory_mode, quantization = EDIT_MODES[name]
        directory = self.export()
        device = self.profile.device
        start = time.perf_counter()
        pipeline = EditPipeline.from_pretrained(
            directory, device=str(device), dtype=self.profile.dtype, quantization=quantization, memory_mode=memory_mode
        )
        load_s = time.perf_counter() - start
        image = torch.rand(
            3, self.profile.resolution, self.profile.resolution, generator=torch.Generator().manual_seed(0)
        )
        settings = {"num_inference_steps": self.profile.edit_steps, "seed": 0, "resolution": self.profile.resolution}
        pipeline(image, INSTRUCTION, **settings)  # warm-up: kernels, allocator, lazy inits
        meter = MemoryMeter(device)
        with meter.measure():
            output = pipeline(image, INSTRUCTION, output_type="pt", **settings)
        edited = output.images[0]
        del pipeline
        return {
            "memory_mode": memory_mode,
            "quantization": quantization,
            "resolution": self.profile.resolution,
            "num_inference_steps": self.profile.edit_steps,
            "load_seconds": round(load_s, 1),
            "seconds_per_edit": round(output.timings["total"], 3),
            "phases_seconds": {k: round(v, 3) for k, v in output.timings.items()},
            "output_finite": bool(torch.isfinite(edited).all()),
            **meter.result,
        }

    # ------------------------------------------------------------------------------------- whole
    def run(self) -> dict[str, Any]:
        """Every part in order, the plans beside them, the comparison, the files."""
        paths = self.configs()
        if self.budget.left() > 0:
            self.start_plans(paths)
        else:
            self.plans = {"skipped": "time budget spent before the plans started"}
        self.run_part("folders", self.part_folders)
        if "error" in self.results["parts"]["folders"] or "skipped" in self.results["parts"]["folders"]:
            for name in PARTS[1:]:
                self.results["parts"][name] = {"skipped": "no model folders (see the folders part)"}
        else:
            self.run_part("train_1gpu", lambda: self.part_train_1gpu(paths["train_1gpu"]))
            self.run_part("train_sharded", lambda: self.part_train_sharded(paths["train_sharded"]))
            for name in EDIT_MODES:
                self.run_part(name, lambda name=name: self.part_edit(name))
        self.collect_plans()
        self.compare()
        self.results["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.write()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.results

    def compare(self) -> None:
        """Measured peak beside the plan's total for the training parts (edit parts carry their own row)."""
        for name in ("train_1gpu", "train_sharded"):
            entry = self.results["parts"].get(name, {})
            plan = self.plans.get(name) if isinstance(self.plans, dict) else None
            if not isinstance(plan, dict) or "memory" not in plan or "skipped" in entry or "error" in entry:
                if isinstance(plan, dict) and "error" in plan:
                    entry["plan_note"] = plan["error"]
                continue
            entry["plan_gib_per_device"] = plan["memory"]["gib_per_device"]
            entry["plan_total_gib"] = plan["memory"]["gib_per_device"]["total"]
        for name in EDIT_MODES:  # the plan's row for each edit that ran
            entry = self.results["parts"].get(name, {})
            if "seconds_per_edit" in entry:
                entry.update(edit_estimate(self.plans, entry["memory_mode"], entry["quantization"], self.profile.dtype))
        for entry in self.results["parts"].values():
            measured, planned = entry.get("max_allocated_gib"), entry.get("plan_total_gib", entry.get("plan_peak_gib"))
            if measured and planned:
                entry["measured_over_plan"] = round(measured / planned, 2)

    def write(self) -> None:
        """Write the JSON and the Markdown table (after every part: a killed run keeps what it had)."""
        if self.args.out is None:
            return
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.results, indent=2) + "\n")
        self.args.out.with_suffix(".md").write_text(markdown(self.results))


def summary(entry: dict[str, Any]) -> str:
    """One line for the console."""
    if "skipped" in entry:
        return f"skipped ({entry['skipped']})"
    if "error" in entry:
        return f"ERROR {entry['error']}"
    keys = ("seconds_per_step", "seconds_per_edit", "max_allocated_gib", "peak_rss_rise_gib", "llava_params")
    return ", ".join(f"{key} {entry[key]}" for key in keys if entry.get(key) is not None) or "done"


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table with provenance."""
    system = results["system"]
    where = system.get("gpu") or f"CPU ({system.get('cpu')})"
    lines = [
        f"# GPU check ({results['profile']} profile)",
        "",
        f"Command: `{results['command']}`  ",
        f"Commit: `{results['commit']}`, date {results['date']}  ",
        f"On: {where}, torch {system['torch']}, CUDA {system['cuda']}, bitsandbytes {system['bitsandbytes']}",
        "",
        "| part | status | s/step or s/edit | peak allocated GiB | peak reserved GiB | plan GiB | measured/plan |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["parts"].items():
        status = (
            "skipped: " + entry["skipped"]
            if "skipped" in entry
            else "error: " + entry["error"]
            if "error" in entry
            else "ok"
        )
        seconds = entry.get("seconds_per_step", entry.get("seconds_per_edit"))
        planned = entry.get("plan_total_gib", entry.get("plan_peak_gib"))
        cells = [
            seconds,
            entry.get("max_allocated_gib"),
            entry.get("max_reserved_gib"),
            planned,
            entry.get("measured_over_plan"),
        ]
        lines.append(
            f"| {name} | {status.replace('|', '/')} | " + " | ".join("" if c is None else str(c) for c in cells) + " |"
        )
    if "elapsed_s" in results:
        lines += ["", f"Whole check: {results['elapsed_s']} s of a {results['budget_s']} s budget."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- side processes
def plans_worker(spec_path: Path) -> None:
    """Compute the plans of ``spec_path`` and write them to ``<spec>.out``."""
    plans = compute_plans(json.loads(spec_path.read_text()))
    Path(f"{spec_path}.out").write_text(json.dumps(plans))


def sharded_worker(config_path: Path, out: Path, profile: Profile) -> None:
    """One Lightning run over ``trainer.devices`` processes (Lightning launches the other ranks); rank 0 writes."""
    if profile.device.type == "cuda":  # this rank's GPU before anything touches one (Lightning sets LOCAL_RANK)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    config = yaml.safe_load(config_path.read_text())
    system = build_system(config)
    devices = int(config["trainer"]["devices"])
    meter = MemoryMeter(profile.device)
    with meter.measure():
        result, trainer = train_steps(system, config, profile, devices, config_path.parent / "sharded")
    if trainer.is_global_zero:
        out.write_text(json.dumps({**result, **meter.result, "memory_is_rank": 0}))


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and run the check (or one of its side processes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results here (JSON; a .md table beside it)")
    parser.add_argument("--tiny", action="store_true", help="the tiny presets on the CPU in float32 (what CI runs)")
    parser.add_argument("--device", default=None, help="cpu (with --tiny) or cuda (default: cuda, cpu for --tiny)")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="global time budget; parts that do not fit are skipped"
    )
    parser.add_argument("--resolution", type=int, default=None, help="edit resolution (default 512; 64 with --tiny)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed training steps after warm-up (default 4; 2 tiny)"
    )
    parser.add_argument(
        "--sharded-ranks", type=int, default=None, help="processes for train_sharded (default: GPU count)"
    )
    parser.add_argument(
        "--parts",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=list(PARTS),
        help=f"comma-separated parts to run (default all: {','.join(PARTS)}); the others are recorded as skipped",
    )
    parser.add_argument("--workdir", default=None, help="where the folders go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (folders, export, configs)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default 1 with --tiny)")
    parser.add_argument("--verbose", action="store_true", help="print each failing part's traceback")
    parser.add_argument("--plans-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sharded-worker", nargs=2, type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    if args.threads is None and (args.tiny or args.profile == "tiny"):
        args.threads = 1  # a tiny model gains nothing from more threads, and shared CPUs lose much to them
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plans_worker is not None:
        plans_worker(args.plans_worker)
        return
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if any(part != "folders" for part in args.parts) and "folders" not in args.parts:
        args.parts.insert(0, "folders")  # every other part reads the folders
    tiny = args.tiny or args.profile == "tiny"
    if args.device is not None and (args.device == "cpu") != tiny:
        parser.error("the full-size check runs on cuda only, the tiny one on cpu only")
    if not tiny and not torch.cuda.is_available():
        parser.error("the full-size check needs a CUDA GPU (it never builds full-size weights on a CPU); use --tiny")
    profile = make_profile(tiny, args.resolution, args.steps)
    if args.sharded_worker is not None:
        sharded_worker(*args.sharded_worker, profile)
        return
    results = Check(args, profile).run()
    failed = [name for name, entry in results["parts"].items() if "error" in entry]
    print(f"done in {results['elapsed_s']} s; " + (f"errors in {', '.join(failed)}" if failed else "no errors"))
    if args.out:
        print(f"results: {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
