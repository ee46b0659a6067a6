"""Full width on a CPU: seconds per step and peak RSS of each stage beside `insightedit plan`'s estimate.

Runs the chain of ``lightning_configs/full_width_cpu.yaml`` from the folders
``benchmarks/full_width_folders.py`` writes (reused when stamped): ``fit`` stages 1, 2, 3 (each from the
previous ``last.ckpt``), ``test`` (2 pairs), ``export``, and one 512x512 ``edit`` per memory mode. Every
command is its own process; its peak RSS is the kernel's ``ru_maxrss`` for that process (``os.wait4``), its
seconds per step the progress line's elapsed time between step 1 and the last step (startup and loading
left out). ``insightedit plan --json`` gives the estimate for the same composed configs (training:
host memory in float32 on one device, which is what a CPU run holds; edits: plan's accelerator peak in
float16, not comparable with CPU RSS). Results: ``benchmarks/results/full_width.{json,md}`` with the load
average, since the CPU is shared.

    python benchmarks/full_width.py [--runs checkpoints/full_width_cpu/bench] [--modes full low ... 8bit]
        [--members instruct_pix2pix mgie smartedit ...] [--out benchmarks/results/full_width]

``tests/test_full_width.py``'s slow test runs :func:`measure` and checks what it returns.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_width_folders import DEFAULT_OUT, write_full_width_folders  # noqa: E402
from provenance import REPOSITORY, provenance  # noqa: E402

OVERLAY = "lightning_configs/full_width_cpu.yaml"
RESULTS = REPOSITORY / "benchmarks" / "results"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
WITHIN = 0.25
MODES = ("full", "low", "sequential", "4bit", "8bit")
OTHER_MEMBERS = ("instruct_pix2pix", "mgie", "smartedit", "insightedit_no_iaa", "insightedit_no_bim")
LOCK = Path("/tmp/bigmem.lock")  # the machine's shared lock for jobs over 3 GiB


def run(args: list[str], log: Path) -> dict[str, Any]:
    """Run ``insightedit *args`` to ``log``; its wall seconds, peak RSS (GiB) and output."""
    with LOCK.open("a") as lock, log.open("w") as out:
        fcntl.flock(lock, fcntl.LOCK_EX)  # big jobs on a shared machine never overlap (released on close)
        start = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "insightedit", *args], cwd=REPOSITORY, env=ENV,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if process.returncode != 0:
        raise SystemExit(f"insightedit {' '.join(args)} failed ({process.returncode}); see {log}:\n{text[-2000:]}")
    return {
        "wall_s": round(time.monotonic() - start, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
        "out": text,
    }


def seconds(clock: str) -> int:
    """``H:MM:SS`` -> seconds."""
    hours, minutes, secs = (int(part) for part in clock.split(":"))
    return 3600 * hours + 60 * minutes + secs


def step_seconds(output: str) -> float | None:
    """Seconds per step after the first, from the progress lines (``step k/n ... elapsed H:MM:SS``)."""
    steps = [(int(k), seconds(t)) for k, t in re.findall(r"step (\d+)/\d+ .*?elapsed (\d+:\d\d:\d\d)", output)]
    if len(steps) < 2:
        return None
    (k0, t0), (k1, t1) = steps[0], steps[-1]
    return round((t1 - t0) / (k1 - k0), 1)


def config_args(configs: list[str]) -> list[str]:
    """``--config`` before each of ``configs``."""
    return [arg for config in configs for arg in ("--config", config)]


def plan(configs: list[str], edit: bool = False) -> Any:
    """``insightedit plan --json`` for ``configs`` (``edit``: the edit plan, float32 at 512)."""
    args = ["plan", *config_args(configs), "--json"]
    if edit:
        args += ["--edit", "--resolution", "512"]
    result = subprocess.run([sys.executable, "-m", "insightedit", *args], cwd=REPOSITORY, env=ENV,
                            capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(result.stdout)


def edit_flags(mode: str) -> list[str]:
    """The ``insightedit edit`` flags of a memory mode (``4bit`` / ``8bit``: the quantized MLLM, low mode)."""
    return [f"--{mode}"] if mode in ("4bit", "8bit") else ["--memory", mode]


def fit_record(fit: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """A fit's seconds per step, wall time, peak RSS beside plan's estimate, and its losses."""
    estimate = plan(configs)["memory"]["gib_per_device"]["total"]
    ratio = fit["peak_rss_gib"] / estimate
    losses = re.findall(r"train/loss ([-+0-9.eE]+|nan|inf)", fit["out"])
    return {"seconds_per_step": step_seconds(fit["out"]), "wall_s": fit["wall_s"], "peak_rss_gib": fit["peak_rss_gib"],
            "plan_gib": estimate, "measured_over_plan": round(ratio, 2), "within_25_percent": abs(ratio - 1) <= WITHIN,
            "losses": [float(v) for v in losses]}  # fmt: skip


def edit_record(model: Path, photo: Path, mode: str, steps: int, log: Path, estimate: float | None) -> dict[str, Any]:
    """One 512x512 ``insightedit edit`` of ``photo`` in ``mode``: seconds, peak RSS, the output's size."""
    from PIL import Image

    out = log.with_suffix(".png")
    result = run(["edit", f"--model={model}", f"--image={photo}", "--instruction=remove the red square",
                  f"--out={out}", f"--steps={steps}", *edit_flags(mode)], log)  # fmt: skip
    timing = re.search(r"total ([0-9.]+) s", result["out"])
    return {"mode": mode, "edit_s": float(timing.group(1)) if timing else None, "wall_s": result["wall_s"],
            "peak_rss_gib": result["peak_rss_gib"], "plan_accelerator_gib": estimate,
            "size": list(Image.open(out).size)}  # fmt: skip


def edit_estimate(plans: list[dict[str, Any]], mode: str) -> float | None:
    """plan's accelerator peak for ``mode`` (``4bit``/``8bit``: the quantized rows), when plan has one."""
    for entry in plans:
        quantized = entry.get("quantization") or ("4bit" if entry.get("four_bit_mllm") else None)
        if mode in ("4bit", "8bit"):
            if quantized == mode and entry.get("memory_mode") in ("full", "low"):
                return entry.get("peak_gib")
        elif not quantized and entry.get("memory_mode") == mode:
            return entry.get("peak_gib")
    return None


def write_photo(path: Path) -> Path:
    """The 512x512 photo every edit reads: a red square on blue (``remove the red square``)."""
    from PIL import Image

    image = Image.new("RGB", (512, 512), (120, 160, 200))
    image.paste((220, 40, 40), (150, 150, 350, 350))
    image.save(path)
    return path


def measure_member(runs: Path, member: str, photo: Path, edit_steps: int = 2) -> dict[str, Any]:
    """A member's full yaml + the overlay: fit 2 steps, export, one ``full`` 512x512 edit of ``photo``."""
    member_configs = [f"lightning_configs/{member}.yaml", OVERLAY]
    folder = runs / "members" / member
    folder.parent.mkdir(parents=True, exist_ok=True)
    fit = run(["fit", *config_args(member_configs), f"--trainer.default_root_dir={folder}", "--overwrite"],
              folder.with_suffix(".fit.log"))  # fmt: skip
    loads = [line.strip() for line in fit["out"].splitlines() if ".pretrained: loaded" in line]
    record = {"member": member, **fit_record(fit, member_configs), "loads": loads}
    exported = run(["export", f"--ckpt_path={folder}/last.ckpt", f"--out={folder}-model", "--overwrite"],
                   folder.with_suffix(".export.log"))  # fmt: skip
    record["export_wall_s"] = exported["wall_s"]
    for checkpoint in folder.glob("*.ckpt"):
        checkpoint.unlink()  # GBs of trained weights and AdamW states each; the export is what is edited
    record["edit"] = edit_record(Path(f"{folder}-model"), photo, "full", edit_steps,
                                 folder.with_suffix(".edit-full.log"), None)  # fmt: skip
    shutil.rmtree(f"{folder}-model")  # GBs; edited once
    print(record, flush=True)
    return record


def measure(runs: Path, modes: list[str], members: list[str], edit_steps: int = 2) -> dict[str, Any]:
    """Run the chain and the members under ``runs``; everything measured, as a report (no file written)."""

    load_before = os.getloadavg()
    write_full_width_folders(REPOSITORY / DEFAULT_OUT)
    runs.mkdir(parents=True, exist_ok=True)
    stages: list[dict[str, Any]] = []
    for stage in (1, 2, 3):
        configs = [f"lightning_configs/stage{stage}.yaml", OVERLAY]
        extra = [f"--model.init_args.init_from={runs}/stage{stage - 1}/last.ckpt"] if stage > 1 else []
        root = f"--trainer.default_root_dir={runs}/stage{stage}"
        fit = run(["fit", *config_args(configs), root, "--overwrite", *extra], runs / f"fit{stage}.log")
        loaded = stage == 1 or ("init_from: loaded" in fit["out"] and f"stage{stage - 1}/last.ckpt" in fit["out"])
        stages.append({"stage": stage, **fit_record(fit, configs), "init_from_loaded": loaded,
                       "checkpoint": (runs / f"stage{stage}" / "last.ckpt").is_file()})  # fmt: skip
        print(stages[-1], flush=True)
        if stage > 1:
            for checkpoint in (runs / f"stage{stage - 1}").glob("*.ckpt"):
                checkpoint.unlink()  # GBs each; the next stage has read it
    configs = ["lightning_configs/stage3.yaml", OVERLAY]
    test = run(["test", *config_args(configs), f"--trainer.default_root_dir={runs}/stage3",
                f"--ckpt_path={runs}/stage3/last.ckpt"], runs / "test.log")  # fmt: skip
    report_file = runs / "stage3" / "test_report.json"
    test_report = json.loads(report_file.read_text()) if report_file.is_file() else None
    model = runs / "model"
    export = run(
        ["export", f"--ckpt_path={runs}/stage3/last.ckpt", f"--out={model}", "--overwrite"], runs / "export.log"
    )
    photo = write_photo(runs / "photo.png")
    edit_plans = plan(configs, edit=True)
    edits = []
    for mode in modes:
        estimate = edit_estimate(edit_plans, mode)
        edits.append(edit_record(model, photo, mode, edit_steps, runs / f"edit-{mode}.log", estimate))
        print(edits[-1], flush=True)
    others = [measure_member(runs, member, photo, edit_steps) for member in members]
    return {**provenance(), "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
            "stages": stages, "test_wall_s": test["wall_s"], "test_peak_rss_gib": test["peak_rss_gib"],
            "test_edits_written": edits_written(test["out"]), "test_out_tail": test["out"][-600:],
            "test_report": test_report, "export_wall_s": export["wall_s"],
            "export_peak_rss_gib": export["peak_rss_gib"], "model": str(model), "photo": str(photo),
            "edit_steps": edit_steps, "edits": edits, "members": others}  # fmt: skip


def edits_written(test_out: str) -> int | None:
    """The number of edited PNGs ``insightedit test`` says it wrote (``edits:  N PNGs ...``), else ``None``."""
    found = re.search(r"edits:\s+(\d+) PNGs", test_out)
    return int(found.group(1)) if found else None


def measure_members_only(runs: Path, members: list[str], edit_steps: int = 2) -> dict[str, Any]:
    """:func:`measure`'s member part alone (``--members-only``), as a report of the same shape."""

    load_before = os.getloadavg()
    write_full_width_folders(REPOSITORY / DEFAULT_OUT)
    runs.mkdir(parents=True, exist_ok=True)
    photo = write_photo(runs / "photo.png")
    others = [measure_member(runs, member, photo, edit_steps) for member in members]
    return {**provenance(), "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
            "stages": [], "edits": [], "members": others, "photo": str(photo), "edit_steps": edit_steps}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the chain and the members, measure, compare with plan, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=DEFAULT_OUT / "bench", help="where the runs and logs go")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--members", nargs="*", default=list(OTHER_MEMBERS), choices=OTHER_MEMBERS,
                        help="the other members' full yamls to fit, export and edit (none: --members)")  # fmt: skip
    parser.add_argument("--members-only", action="store_true",
                        help="only the other members (no stage chain, test or memory modes)")  # fmt: skip
    parser.add_argument("--edit-steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "full_width")
    args = parser.parse_args(argv)
    runs = (REPOSITORY / args.runs).resolve()
    if args.members_only:
        report = measure_members_only(runs, args.members, args.edit_steps)
    else:
        report = measure(runs, args.modes, args.members, args.edit_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    """The results as tables, with provenance and load."""
    lines = [
        "# Full width on a CPU (lightning_configs/full_width_cpu.yaml)",
        "",
        f"`{report['command']}` at {report['commit']}, {report['date']}; {report['cpu_count']} CPUs shared, load "
        f"average {report['load_average_before'][0]} before, {report['load_average_after'][0]} after.",
        "",
        "| stage | s/step | wall s | peak RSS GiB | plan GiB | measured/plan | within 25% |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in report["stages"]:
        within = "yes" if s["within_25_percent"] else "no"
        lines.append(f"| {s['stage']} | {s['seconds_per_step']} | {s['wall_s']} | {s['peak_rss_gib']} | "
                     f"{s['plan_gib']} | {s['measured_over_plan']} | {within} |")  # fmt: skip
    if report["stages"]:
        lines += ["", f"test (2 pairs): {report['test_wall_s']} s, peak RSS {report['test_peak_rss_gib']} GiB; "
              f"export: {report['export_wall_s']} s", "",
              f"| edit 512x512, {report['edit_steps']} steps | edit s | wall s | peak RSS GiB | plan accelerator GiB |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for e in report["edits"]:
        lines.append(
            f"| {e['mode']} | {e['edit_s']} | {e['wall_s']} | {e['peak_rss_gib']} | {e['plan_accelerator_gib']} |"
        )
    if report.get("members"):
        lines += ["", "Every other member's full yaml with the same overlay (its stage as written, 2 steps, from the "
                  "folders; export; one 512x512 `--memory full` edit):", "",
                  "| member | s/step | fit wall s | peak RSS GiB | plan GiB | measured/plan | export s | edit s "
                  "| edit peak GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for m in report["members"]:
            lines.append(f"| {m['member']} | {m['seconds_per_step']} | {m['wall_s']} | {m['peak_rss_gib']} | "
                         f"{m['plan_gib']} | {m['measured_over_plan']} | {m['export_wall_s']} | "
                         f"{m['edit']['edit_s']} | {m['edit']['peak_rss_gib']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
