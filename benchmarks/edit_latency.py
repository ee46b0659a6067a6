"""Edit latency: a member's EditPipeline against diffusers' StableDiffusionInstructPix2PixPipeline, same UNet and steps.

Both pipelines drive the *same* UNet object (InstructPix2Pix sees it with its plain text-only attention
processors, the member with its own, e.g. InsightEdit's decoupled image branch), the same VAE, the same
sampler (DDIM on the same schedule) and the same number of steps, on the same source image, batch 1.
InsightEdit adds one MLLM pass and one bridge pass per edit and a second cross-attention per layer per
step. Latency is the median over interleaved runs in one process; the share of the conditions (MLLM +
bridge: the pipeline's ``understand`` phase) comes from the pipeline's own phase timings. Peak memory is
measured in a fresh child process per pipeline (so one pipeline's freed memory cannot hide the other's):
on CUDA ``max_memory_allocated``, on the CPU the peak rise of the resident set during the first edit,
sampled every 2 ms, plus the weights each pipeline holds. Rows name the member; its columns are
``member_*``.

    python benchmarks/edit_latency.py                 # tiny (3.9M UNet) and small (22M UNet), 20 steps
    python benchmarks/edit_latency.py --configs tiny --runs 3 --threads 1
    python benchmarks/edit_latency.py --member smartedit --configs tiny --runs 1 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from diffusers.utils import logging as diffusers_logging
from peak_memory import PeakRss  # benchmarks/peak_memory.py
from provenance import provenance  # benchmarks/provenance.py (the script's folder is on sys.path)

from insightedit.models.zoo import MEMBERS
from insightedit.pipeline import EditPipeline
from insightedit.pipeline.settings import make_scheduler
from insightedit.systems.editor_system import EditorSystem

INSTRUCTION = "remove the red circle"
CONFIGS: dict[str, dict[str, Any]] = {
    # the tiny preset's UNet (3.9M) on a 4-channel VAE latent (tiny VAE, /2), 64 px → 32×32 latent
    "tiny": {
        "resolution": 64,
        "unet_config": {"block_out_channels": (64, 128), "layers_per_block": 1, "in_channels": 4, "out_channels": 4},
    },
    # a ~22M UNet, two ResNets per level, 96 px → 48×48 latent
    "small": {
        "resolution": 96,
        "unet_config": {"block_out_channels": (128, 256), "layers_per_block": 2, "in_channels": 4, "out_channels": 4},
    },
}


def build(
    name: str, device: torch.device, member: str = "insightedit"
) -> tuple[EditPipeline, StableDiffusionInstructPix2PixPipeline]:
    """A tiny ``member`` of config ``name`` and diffusers' InstructPix2Pix on the same parts."""
    torch.manual_seed(0)
    config = CONFIGS[name]
    unet_config = {**config["unet_config"], "norm_num_groups": 16}
    generation_args = {"latent": "vae", "unet_config": unet_config}
    system = EditorSystem(member=member, preset="tiny", stage=3, generation=generation_args)
    system.to(device).eval()
    ours = EditPipeline.from_system(system)
    generation = ours.generation
    theirs = StableDiffusionInstructPix2PixPipeline(
        vae=generation.latent_space.vae,
        text_encoder=generation.text_encoder.model,
        tokenizer=generation.text_encoder.tokenizer,
        unet=generation.unet.unet,
        scheduler=make_scheduler(ours.base_scheduler(), "ddim"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def run_ours(pipe: EditPipeline, image: torch.Tensor, steps: int) -> dict[str, float]:
    """One edit by the member; its phase timings (``understand``, ``generate``, ``total``)."""
    return pipe(image, INSTRUCTION, num_inference_steps=steps, seed=0, output_type="pt").timings


def run_theirs(
    pipe: StableDiffusionInstructPix2PixPipeline, ours: EditPipeline, image: torch.Tensor, steps: int
) -> float:
    """One InstructPix2Pix edit on the same UNet with its text-only processors; seconds."""
    start = time.perf_counter()
    with ours.generation.unet._text_only():
        pipe(
            INSTRUCTION,
            image=image[None],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
    if image.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers of ``modules``."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def child(name: str, which: str, steps: int, device: torch.device, member: str) -> dict[str, Any]:
    """Peak memory of one pipeline's first edit, in this (fresh) process."""
    ours, theirs = build(name, device, member)
    image = torch.rand(3, CONFIGS[name]["resolution"], CONFIGS[name]["resolution"], device=device)
    generation = ours.generation
    if which == "ip2p":
        weights = weight_bytes(generation.unet.unet, generation.latent_space, generation.text_encoder)
    else:
        weights = weight_bytes(*ours.editor.understanding_modules(), generation.unet, generation.latent_space)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRss() as rss:
        run_theirs(theirs, ours, image.cpu(), steps) if which == "ip2p" else run_ours(ours, image.cpu(), steps)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else rss.rise
    return {"weights_bytes": weights, "peak_rise_bytes": int(peak)}


def measure_memory(name: str, which: str, steps: int, device: str, member: str) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter."""
    command = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--configs",
        name,
        "--steps",
        str(steps),
        "--device",
        device,
        "--threads",
        str(torch.get_num_threads()),
        "--member",
        member,
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def bench(name: str, steps: int, runs: int, device: torch.device, member: str) -> dict[str, Any]:
    """Interleaved latency of both pipelines on config ``name``, and each one's peak memory."""
    ours, theirs = build(name, device, member)
    size = CONFIGS[name]["resolution"]
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    unet_params = sum(p.numel() for p in ours.generation.unet.unet.parameters())
    run_theirs(theirs, ours, image, steps), run_ours(ours, image, steps)  # warm up
    ip2p, edits, conditions = [], [], []
    for _ in range(runs):
        ip2p.append(run_theirs(theirs, ours, image, steps))
        timings = run_ours(ours, image, steps)
        edits.append(timings["total"])
        conditions.append(timings["understand"])
    row = {
        "member": member,
        "config": name,
        "unet_params": unet_params,
        "resolution": size,
        "steps": steps,
        "ip2p_s": statistics.median(ip2p),
        "member_s": statistics.median(edits),
        "conditions_s": statistics.median(conditions),
    }
    row["ratio"] = row["member_s"] / row["ip2p_s"]
    row["conditions_share"] = row["conditions_s"] / row["member_s"]
    for which in ("ip2p", "member"):
        row[f"{which}_memory"] = measure_memory(name, which, steps, str(device), member)
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the results."""
    mib = 2**20
    lines = [
        "| member | UNet | px | steps | InstructPix2Pix s | member s | ratio | conditions share "
        "| weights MiB (IP2P / member) | peak rise MiB (IP2P / member) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a, b = r["ip2p_memory"], r["member_memory"]
        lines.append(
            f"| {r['member']} | {r['config']} ({r['unet_params'] / 1e6:.1f}M) | {r['resolution']} | {r['steps']} "
            f"| {r['ip2p_s']:.3f} | {r['member_s']:.3f} | {r['ratio']:.2f}× | {100 * r['conditions_share']:.2f}% "
            f"| {a['weights_bytes'] / mib:.1f} / {b['weights_bytes'] / mib:.1f} "
            f"| {a['peak_rise_bytes'] / mib:.1f} / {b['peak_rise_bytes'] / mib:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member", default="insightedit", choices=list(MEMBERS), help="the member to time")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--child", choices=["ip2p", "member"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "edit_latency.json")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(child(args.configs[0], args.child, args.steps, device, args.member)))
        return
    rows = [bench(name, args.steps, args.runs, device, args.member) for name in args.configs]
    table = format_table(rows)
    print(table)
    result = {
        **provenance(),
        "device": str(device),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "table": table,
        "goal": "InsightEdit within 1.15x of InstructPix2Pix at equal UNet and steps",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
