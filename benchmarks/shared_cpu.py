"""Edit and training-step speed on a shared CPU: idle, beside 1 and beside 2 busy processes, per thread setting.

For each thread setting and each number of busy processes (0, 1, 2) a fresh child interpreter (so that
OpenMP reads its environment when torch loads, as in a new ``insightedit`` command) builds a tiny
InsightEdit (:class:`EditorSystem`, tiny preset, stage 3), starts the busy processes, and times

* **edit**: one :class:`EditPipeline` call, 64 px, 20 DDIM steps, batch 1 (what ``insightedit edit``
  does once its model folder is loaded), in the main thread;
* **step**: one stage-3 training step (losses, backward, AdamW) on a batch of 4 at 32 px, as in
  ``benchmarks/step_cost.py``.

A busy process is a pure-Python loop (``while True: pass``): one core's worth of work that never
sleeps, like another job's single-threaded process. Each time is the median of ``--runs`` (fewer when
a cell's repeats pass ``--cell-seconds``). Before each cell the script records the machine's 1-minute load
average and, during it, the share of the machine's CPU time used by all processes (``/proc/stat``), so
an "idle" row on a machine that other jobs share says how idle it was.

Settings: ``default`` is torch as installed (no ``OMP_*`` variables: torch's default intra-op thread
count, libgomp's default spin-then-sleep waits); ``chosen`` is what ``insightedit`` applies
(:func:`insightedit.threads.configure_threads` before torch loads, as the CLI does). ``one``
(``OMP_NUM_THREADS=1``) and ``passive`` (``OMP_WAIT_POLICY=PASSIVE``) are there to compare.

    python benchmarks/shared_cpu.py                       # default + chosen, ~5 min on 2 idle cores
    python benchmarks/shared_cpu.py --settings default chosen one passive --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "INSIGHTEDIT_THREADS")
SETTINGS: dict[str, dict[str, str]] = {  # extra environment of each setting's child (after the variables are cleared)
    "default": {"INSIGHTEDIT_THREADS": "off"},
    "chosen": {},
    "one": {"OMP_NUM_THREADS": "1", "INSIGHTEDIT_THREADS": "off"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "INSIGHTEDIT_THREADS": "off"},
    "spin10k": {"GOMP_SPINCOUNT": "10000", "INSIGHTEDIT_THREADS": "off"},  # spin briefly, then sleep
}
SPIN = "while True: pass"


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from ``/proc/stat``."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


# ------------------------------------------------------------------------------------------- child
def child(setting: str, busy: int, runs: int, cell_seconds: float) -> dict[str, Any]:
    """Build the tiny model, start ``busy`` spinners, time edits and steps; runs in a fresh interpreter."""
    if setting == "chosen":
        from insightedit.threads import configure_threads

        configure_threads()
    import torch
    from step_cost import batch_for  # benchmarks/step_cost.py

    from insightedit.pipeline import EditPipeline
    from insightedit.systems.editor_system import EditorSystem

    torch.manual_seed(0)
    system = EditorSystem(member="insightedit", preset="tiny", stage=3)
    pipe = EditPipeline.from_system(system, resolution=64)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = batch_for(system, 4, 32)
    optimizer = system.configure_optimizers()["optimizer"]

    def edit() -> None:
        system.eval()
        pipe(image, "remove the red circle", num_inference_steps=20, seed=0, output_type="pt")

    def step() -> None:
        system.train()
        system.compute_losses(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    edit(), step()  # warm up (allocator, lazy inits) before the busy processes start
    load = os.getloadavg()[0]
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        time.sleep(0.5)
        cells: dict[str, Any] = {}
        for name, function in (("edit", edit), ("step", step)):
            busy_before, total_before = cpu_jiffies()
            times: list[float] = []
            started = time.perf_counter()
            while len(times) < runs and (len(times) < 1 or time.perf_counter() - started < cell_seconds):
                start = time.perf_counter()
                function()
                times.append(time.perf_counter() - start)
            busy_after, total_after = cpu_jiffies()
            cells[name] = {
                "seconds": statistics.median(times),
                "runs": [round(t, 4) for t in times],
                "machine_cpu_busy": round((busy_after - busy_before) / max(1, total_after - total_before), 3),
            }
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return {
        "setting": setting,
        "busy": busy,
        "loadavg_1min_before": round(load, 2),
        "torch_threads": torch.get_num_threads(),
        "environment": {key: os.environ[key] for key in THREAD_VARIABLES if key in os.environ},
        **cells,
    }


# ------------------------------------------------------------------------------------------ parent
def run_cell(setting: str, busy: int, runs: int, cell_seconds: float) -> dict[str, Any]:
    """Run :func:`child` for one cell in a fresh interpreter with the setting's environment."""
    environment = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    environment.update(SETTINGS[setting])
    environment.setdefault("HF_HUB_OFFLINE", "1")
    environment.setdefault("WANDB_MODE", "offline")
    command = [sys.executable, __file__, "--child", setting, str(busy), "--runs", str(runs)]
    command += ["--cell-seconds", str(cell_seconds)]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"cell {setting}/{busy} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, busy): seconds, slowdown against the same setting idle, slowdown per busy core."""
    idle = {(c["setting"], kind): c[kind]["seconds"] for c in cells if c["busy"] == 0 for kind in ("edit", "step")}
    rows = []
    for cell in cells:
        row: dict[str, Any] = {
            "setting": cell["setting"],
            "busy": cell["busy"],
            "threads": cell["torch_threads"],
            "load": cell["loadavg_1min_before"],
        }
        for kind in ("edit", "step"):
            seconds = cell[kind]["seconds"]
            slowdown = seconds / idle[(cell["setting"], kind)] if (cell["setting"], kind) in idle else None
            row[f"{kind}_s"] = round(seconds, 3)
            row[f"{kind}_slowdown"] = round(slowdown, 2) if slowdown else None
            # the goal: at most 2x per extra busy core, i.e. slowdown <= 2 ** busy
            row[f"{kind}_per_busy_core"] = (
                round(slowdown ** (1 / cell["busy"]), 2) if slowdown and cell["busy"] else None
            )
            row[f"{kind}_machine_cpu_busy"] = cell[kind]["machine_cpu_busy"]
        rows.append(row)
    return rows


def slowdown_text(row: dict[str, Any], kind: str) -> str:
    """``"2.16× (1.47×)"``: the slowdown against idle and per busy core; ``"1 (idle)"`` on idle rows."""
    if not row["busy"] or row[f"{kind}_slowdown"] is None:
        return "1 (idle)"
    return f"{row[f'{kind}_slowdown']:.2f}× ({row[f'{kind}_per_busy_core']:.2f}×)"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| setting | busy processes | torch threads | load before | edit s | edit slowdown (per busy core) "
        "| step s | step slowdown (per busy core) | machine CPU busy (edit / step) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = {kind: slowdown_text(r, kind) for kind in ("edit", "step")}
        lines.append(
            f"| {r['setting']} | {r['busy']} | {r['threads']} | {r['load']:.2f} | {r['edit_s']:.3f} "
            f"| {ratio['edit']} | {r['step_s']:.3f} | {ratio['step']} "
            f"| {100 * r['edit_machine_cpu_busy']:.0f}% / {100 * r['step_machine_cpu_busy']:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    """Measure every cell, print the table, write ``--out``.json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["default", "chosen"], choices=list(SETTINGS))
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2], help="numbers of busy processes")
    parser.add_argument("--runs", type=int, default=5, help="timed repeats per cell (median)")
    parser.add_argument("--cell-seconds", type=float, default=15.0, help="stop repeating a cell after this")
    parser.add_argument("--out", type=Path, default=RESULTS / "shared_cpu", help="writes OUT.json and OUT.md")
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "BUSY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.runs, args.cell_seconds)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import provenance  # benchmarks/provenance.py

    started = time.perf_counter()
    cells = []
    for setting in args.settings:
        for busy in args.busy:
            cell = run_cell(setting, busy, args.runs, args.cell_seconds)
            print(
                f"{setting:8} busy={busy} threads={cell['torch_threads']} load={cell['loadavg_1min_before']:.2f} "
                f"edit {cell['edit']['seconds']:.3f} s  step {cell['step']['seconds']:.3f} s",
                flush=True,
            )
            cells.append(cell)
    rows = summarise(cells)
    table = format_table(rows)
    print(table)
    result = {
        **provenance(),
        "machine": {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))},
        "busy_process": f"python -c {SPIN!r} (one core's worth of work, never sleeps)",
        "workload": {
            "edit": "EditPipeline, tiny InsightEdit (EditorSystem tiny stage 3), 64 px, 20 DDIM steps, batch 1",
            "step": "EditorSystem tiny stage 3: compute_losses + backward + AdamW, batch 4, 32 px",
        },
        "goal": "at most 2x slower per extra busy core (slowdown <= 2 ** busy)",
        "seconds_total": round(time.perf_counter() - started, 1),
        "rows": rows,
        "cells": cells,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = [
        "# Edit and training-step speed on a shared CPU",
        "",
        f"`{result['command']}` at `{result['commit']}`, {result['date']}; {result['seconds_total']} s in all.",
        f"Busy process: {result['busy_process']}. Edit: {result['workload']['edit']}. "
        f"Step: {result['workload']['step']}. Seconds are medians; slowdowns are against the same setting's "
        "idle row. Goal: " + result["goal"] + ".",
        "",
        table,
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(markdown))
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
