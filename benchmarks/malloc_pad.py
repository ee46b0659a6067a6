"""The README's main job with and without glibc heap padding (insightedit/allocator.py), idle and beside a busy process.

Each cell runs ``insightedit fit --config lightning_configs/tiny/stage3.yaml --trainer.max_steps=N`` in a
fresh child process (the padding is a process-wide allocator setting, so the compared settings cannot
share one process) and reads the child's resource usage from ``os.wait4``: wall time, user and system
CPU time, minor page faults and peak RSS, with the training loop's steps/s and last loss from its log.

Settings: ``glibc`` is glibc's own behaviour (:func:`insightedit.allocator.pad_heap` disabled in the
child); ``pad64`` sets ``MALLOC_TOP_PAD_=64 MiB`` (glibc reads it, ``pad_heap`` then leaves it); ``pad256``
is what ``insightedit`` does by default. Loads: 0 (idle) and 1 busy process (``while True: pass``, one
core's worth of another job). Cells run in the order setting-major, so a drift in the machine's load shows
as a drift across settings; every cell records the 1-minute load average before it started.

    python benchmarks/malloc_pad.py                  # 3 settings x 2 loads x 120 steps, ~7 min on 2 cores
    python benchmarks/malloc_pad.py --steps 300 --loads 0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REPOSITORY, provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = "lightning_configs/tiny/stage3.yaml"
SETTINGS: dict[str, dict[str, str]] = {"glibc": {}, "pad64": {"MALLOC_TOP_PAD_": str(64 * 2**20)}, "pad256": {}}
NO_PAD = "import insightedit.allocator as a; a.pad_heap = lambda *args, **kwargs: False; "
SPIN = "while True: pass"
STEP_LINE = re.compile(r"step (\d+)/(\d+) .*?([\d.]+) steps/s.*train/loss ([\d.]+)")


def run_cell(setting: str, busy: int, steps: int, root: Path) -> dict[str, Any]:
    """One ``insightedit fit`` child under ``setting`` beside ``busy`` spinning processes; its measurements."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TOP_PAD_"}
    env.update(SETTINGS[setting], HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    prefix = NO_PAD if setting == "glibc" else ""
    code = prefix + "import sys; from insightedit.cli import main; sys.exit(main(sys.argv[1:]))"
    run_dir = root / f"{setting}-{busy}"
    argv = [sys.executable, "-c", code, "fit", "--config", CONFIG, f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={run_dir}"]  # fmt: skip
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    load = os.getloadavg()[0]
    log = run_dir.with_suffix(".log")
    try:
        start = time.perf_counter()
        with log.open("w") as out:
            child = subprocess.Popen(argv, cwd=REPOSITORY, env=env, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    text = log.read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{setting} beside {busy}: the run failed; its log:\n{text[-3000:]}")
    matches = [m for m in STEP_LINE.finditer(text) if int(m.group(1)) == int(m.group(2))]
    final = matches[-1] if matches else None
    return {
        "setting": setting,
        "busy": busy,
        "load_before": round(load, 2),
        "wall_s": round(wall, 1),
        "user_s": round(usage.ru_utime, 1),
        "system_s": round(usage.ru_stime, 1),
        "minor_faults": int(usage.ru_minflt),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
        "steps_per_s": float(final.group(3)) if final else None,
        "final_loss": float(final.group(4)) if final else None,
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table, with each setting's steps/s relative to glibc's at the same load."""
    base = {r["busy"]: r["steps_per_s"] for r in rows if r["setting"] == "glibc"}
    lines = [
        "# glibc heap padding and the main job's speed",
        "",
        f"`{meta['command']}` at commit `{meta['commit']}`, {meta['date']}; {meta['steps']} steps of `{CONFIG}`",
        "per cell, each cell a fresh `insightedit fit` child (benchmarks/malloc_pad.py). `busy` = spinning",
        "processes beside it on the 2 cores; `load` = 1-minute load average before the cell.",
        "",
        "| setting | busy | load | wall s | user s | system s | minor faults | peak RSS GiB | steps/s | × glibc "
        "| last loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["steps_per_s"] / base[r["busy"]] if r["steps_per_s"] and base.get(r["busy"]) else float("nan")
        lines.append(
            f"| {r['setting']} | {r['busy']} | {r['load_before']} | {r['wall_s']} | {r['user_s']} | {r['system_s']} | "
            f"{r['minor_faults']:,} | {r['peak_rss_gib']} | {r['steps_per_s']} | {ratio:.2f} | {r['final_loss']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every (setting, load) cell; write ``malloc_pad.{md,json}`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps per cell")
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1], help="busy processes beside each run")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    meta = {**provenance(), "steps": args.steps}
    rows = []
    with tempfile.TemporaryDirectory(prefix="malloc-pad-") as root:
        for setting in args.settings:
            for busy in args.loads:
                rows.append(run_cell(setting, busy, args.steps, Path(root)))
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "malloc_pad.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (args.out / "malloc_pad.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
