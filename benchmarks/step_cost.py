"""Cost of a member's understanding path in training: its stage-3 step against an InstructPix2Pix step.

Both run in one process on the *same* UNet object (the member's generator): the InstructPix2Pix step
conditions it on the frozen text encoder's encoding of the instruction and trains the UNet; the member's
step runs its whole stage-3 training step (for InsightEdit: MLLM + LoRA, Q-Former, BIM, IAA, UNet) through
:class:`~insightedit.systems.editor_system.EditorSystem` and trains what its stage 3 trains. Reports median
milliseconds per step (forward, backward, AdamW), their ratio, and the peak resident-memory rise of each
phase (sampled every 2 ms).

    python benchmarks/step_cost.py --batch-size 16 --steps 30
    python benchmarks/step_cost.py --member smartedit --batch-size 4 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peak_memory import PeakRss  # benchmarks/peak_memory.py
from provenance import provenance  # benchmarks/provenance.py (the script's folder is on sys.path)

from insightedit.models.zoo import MEMBERS
from insightedit.systems.editor_system import EditorSystem


def batch_for(system: EditorSystem, batch_size: int, resolution: int) -> dict:
    """A random batch with every key a member's stage-3 losses read."""
    size = system.editor.mllm_image_size() or resolution
    instruction = "replace the red circle with a blue square"
    return {
        "source": torch.rand(batch_size, 3, resolution, resolution) * 2 - 1,
        "target": torch.rand(batch_size, 3, resolution, resolution) * 2 - 1,
        "mllm_source": torch.randn(batch_size, 3, size, size),
        "clip_target": torch.randn(batch_size, 3, 32, 32),
        "instruction": [instruction] * batch_size,
        "plain_instruction": [instruction] * batch_size,
        "target_caption": ["a blue square on a grey background"] * batch_size,
    }


def time_steps(step: Callable[[], None], steps: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    """Run both steps and print (and optionally save) the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member", default="insightedit", choices=list(MEMBERS), help="the member to time")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    system = EditorSystem(member=args.member, preset="tiny", stage=3).train()
    generation = system.editor.generation
    batch = batch_for(system, args.batch_size, args.resolution)

    unet_params = list(generation.unet.parameters())
    ip2p_optimizer = torch.optim.AdamW(unet_params, lr=1e-5)

    def ip2p_step() -> None:
        loss = generation.diffusion_loss(batch["source"], batch["target"], generation.encode_text(batch["instruction"]))
        loss.backward()
        ip2p_optimizer.step()
        ip2p_optimizer.zero_grad(set_to_none=True)

    member_optimizer = system.configure_optimizers()["optimizer"]

    def member_step() -> None:
        system.compute_losses(batch)["loss"].backward()
        member_optimizer.step()
        member_optimizer.zero_grad(set_to_none=True)

    # warm both first (allocator, lazy inits), then measure each: neither pays the other's first-run costs
    time_steps(ip2p_step, 0, args.warmup)
    time_steps(member_step, 0, args.warmup)
    with PeakRss() as ip2p_memory:
        ip2p = time_steps(ip2p_step, args.steps, 0)
    with PeakRss() as member_memory:
        member = time_steps(member_step, args.steps, 0)
    result = {
        "member": args.member,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "threads": torch.get_num_threads(),
        "instructpix2pix_ms": round(statistics.median(ip2p), 1),
        f"{args.member}_stage3_ms": round(statistics.median(member), 1),
        "ratio": round(statistics.median(member) / statistics.median(ip2p), 2),
        "instructpix2pix_peak_rss_rise_mib": round(ip2p_memory.rise_mib, 1),
        f"{args.member}_peak_rss_rise_mib": round(member_memory.rise_mib, 1),
        "trainable_params": {
            "instructpix2pix": sum(p.numel() for p in unet_params),
            f"{args.member}_stage3": sum(p.numel() for p in system.parameters() if p.requires_grad),
        },
    }
    result = {**provenance(), **result}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
