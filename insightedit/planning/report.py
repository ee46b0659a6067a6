"""The training plan for people: parameters, memory with a verdict per named GPU, FLOPs and GPU-hours.

:func:`fits_on_gpus` and :func:`time_on_gpus` turn a plan's bytes and FLOPs into the JSON fields ``fits``
and ``gpu_hours`` (:mod:`insightedit.planning.hardware` states the margins and the MFU); :func:`format_plan`
prints the whole plan as plain text, the method wrapped to the terminal's width.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any

from insightedit.planning.hardware import (
    CONTEXT_GIB,
    FRAGMENTATION,
    GIB,
    GPUS,
    PAPER_PAIRS,
    TIMED,
    gpu_hours,
    gpu_named,
    memory_verdict,
)


def fits_on_gpus(total_bytes: int) -> dict[str, Any]:
    """``{"margin": ..., "gpus": {name: {"memory_gib", "verdict"}}}`` for a per-device estimate."""
    gib = total_bytes / GIB
    return {
        "margin": f"estimate + {CONTEXT_GIB:.1f} GiB CUDA context + {FRAGMENTATION:.0%} of the estimate",
        "gpus": {gpu.name: {"memory_gib": gpu.memory_gib, "verdict": memory_verdict(gib, gpu)} for gpu in GPUS},
    }


def time_on_gpus(
    flops_per_sample: int, epochs: float, schedule: dict[str, Any], world_size: int, mfu: float
) -> dict[str, Any]:
    """GPU-hours of ``epochs`` over the paper's pairs, and of the config's own schedule, on the timed GPUs."""
    runs = {"paper": {"samples": PAPER_PAIRS * epochs, "epochs": epochs}}
    if schedule.get("samples"):
        runs["config"] = {"samples": schedule["samples"], "epochs": round(schedule["samples"] / PAPER_PAIRS, 2)}
    result: dict[str, Any] = {"mfu": mfu, "pairs": PAPER_PAIRS, "world_size": world_size, "schedule": schedule}
    for run, spec in runs.items():
        hours = {name: gpu_hours(flops_per_sample, spec["samples"], gpu_named(name), mfu) for name in TIMED}
        result[run] = spec | {
            "gpu_hours": {name: round(value, 1) for name, value in hours.items()},
            "wall_hours": {name: round(value / world_size, 2) for name, value in hours.items()},
        }
    return result


def _stage_line(plan: dict[str, Any]) -> str:
    stage = plan["stage"]
    member = plan.get("member") or "the model"
    number = plan.get("stage_number")
    label = f"stage {number} ({stage['name']!r})" if number is not None else f"stage {stage['name']!r}"
    return f"{member}, {label}: trains {', '.join(stage['train'])}"


def _wrapped(label: str, text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=f"  {label}: ", subsequent_indent="    ")


def format_plan(plan: dict[str, Any], width: int | None = None) -> str:
    """The plan as plain text: tables, verdicts and the method wrapped to ``width`` (default: the terminal's)."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 110)
    lines = [_stage_line(plan)] if plan["stage"] else []
    lines.append(f"{'part':<20} {'params':>15} {'trainable':>15}")
    for name, count in plan["modules"].items():
        lines.append(f"{name:<20} {count['params']:>15,} {count['trainable']:>15,}")
    lines.append(f"{'total':<20} {plan['total']['params']:>15,} {plan['total']['trainable']:>15,}")
    memory = plan["memory"]
    s = memory["settings"]
    lines += [
        "",
        f"memory per device: {s['strategy']} x {s['world_size']}, {s['precision']}, batch {s['batch_size']} "
        f"per device at {s['resolution']}px" + (f", LLM {s['quantization']}" if s["quantization"] else ""),
    ]
    for kind, gib in memory["gib_per_device"].items():
        lines.append(f"  {kind:<30} {gib:>8.2f} GiB")
    for part, gib in memory["activation_parts_gib"].items():
        lines.append(f"    {'activations/' + part:<28} {gib:>8.3f} GiB")
    lines += [f"note: {note}" for note in memory["notes"]]
    fits = plan["fits"]
    lines += ["", f"fits per device? ({fits['margin']})"]
    for name, entry in fits["gpus"].items():
        lines.append(f"  {name:<22} {entry['memory_gib']:>6.1f} GiB  {entry['verdict']}")
    flops = plan["flops_per_sample"]
    unit, scale = ("TFLOP", 1e12) if flops["total"] >= 1e12 else ("GFLOP", 1e9)
    lines += [
        "",
        f"training FLOPs per sample at {flops['resolution']}px ({unit}; MLLM over vision patches + "
        f"{flops['mllm_text_tokens']} text tokens + [MM])",
        f"  {'group':<10} {'forward':>9} {'backward':>9} {'recompute':>9} {'total':>9}",
    ]
    for name, group in flops["groups"].items():
        if group["total"] < 5e-4 * flops["total"]:  # e.g. a loss computed outside any module: in --json only
            continue
        values = (group[key] / scale for key in ("forward", "backward", "recompute", "total"))
        lines.append(f"  {name:<10} " + " ".join(f"{value:>9.3f}" for value in values))
    lines.append(f"  {'total':<10} {'':>9} {'':>9} {'':>9} {flops['total'] / scale:>9.3f}")
    hours = plan["gpu_hours"]
    lines += [
        "",
        f"GPU-hours at {hours['mfu']:.0%} MFU (bf16 dense peak: A100 312, H100 SXM 989 TFLOP/s; "
        f"wall hours on the config's {hours['world_size']} process(es))",
    ]
    for run in ("paper", "config"):
        if run not in hours:
            continue
        spec = hours[run]
        what = (
            f"{spec['epochs']:g} epoch(s) of the paper's {hours['pairs']:,} pairs"
            if run == "paper"
            else f"this config's {hours['schedule']['max_steps']:,} steps x {hours['schedule']['samples_per_step']} "
            f"samples ({spec['epochs']:g} epochs)"
        )
        per_gpu = ", ".join(
            f"{name} {value:,.1f} GPU-h ({spec['wall_hours'][name]:,.2f} h wall)"
            for name, value in spec["gpu_hours"].items()
        )
        lines.append(f"  {what}: {per_gpu}")
    lines += ["", "method:"]
    for label, text in plan["method"].items():
        lines += _wrapped(label, text, width)
    return "\n".join(lines)


__all__ = ["fits_on_gpus", "format_plan", "time_on_gpus"]
