"""benchmarks/gpu_check.py: its tiny CPU rehearsal runs every part and records numbers or why a part did not run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PARTS = ("folders", "train_1gpu", "train_sharded", "edit_full", "edit_low", "edit_sequential", "edit_4bit", "edit_8bit")


def run_check(tmp_path: Path, *extra: str) -> dict:
    """Run the check as a user would, in a fresh interpreter; return its JSON (the Markdown must be there too)."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--workdir", str(tmp_path / "work"), *extra]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "results: " in result.stdout
    results = json.loads(out.read_text())
    table = out.with_suffix(".md").read_text()
    assert all(f"| {part} |" in table for part in PARTS)
    assert not (tmp_path / "work").exists()  # the folders are removed unless --keep
    return results


def check_provenance(results: dict) -> None:
    assert results["command"].startswith("python ") and "--tiny" in results["command"]
    assert results["commit"] and results["date"]
    assert results["profile"] == "tiny"
    system = results["system"]
    assert system["torch"] and "cuda" in system and system["gpu"] is None and system["gpu_count"] == 0


def finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_every_part_skipped_with_its_reason_when_the_budget_is_spent(tmp_path):
    """The global budget: a part that does not fit is skipped and says so, and the files are still written."""
    results = run_check(tmp_path, "--budget-s", "0")
    check_provenance(results)
    assert set(results["parts"]) == set(PARTS)
    assert results["parts"]["folders"]["skipped"].startswith("time budget")
    for name in PARTS[1:]:  # every other part reads the folders
        assert results["parts"][name]["skipped"] == "no model folders (see the folders part)", name
    assert results["plans"]["skipped"].startswith("time budget")  # and the plans say so too


@pytest.mark.slow  # the whole rehearsal: 4-6 min on 2 shared cores (load 8)
def test_tiny_rehearsal_measures_every_part(tmp_path):
    results = run_check(tmp_path, "--budget-s", "1200")
    check_provenance(results)
    parts = results["parts"]
    assert set(parts) == set(PARTS)
    assert not [name for name, entry in parts.items() if "error" in entry], parts
    # one CPU: the sharded part is skipped, and says why
    assert "sharding needs more than one" in parts["train_sharded"]["skipped"]
    assert parts["folders"]["llava_params"] > 0 and parts["folders"]["unet_params"] > 0

    train = parts["train_1gpu"]
    assert train["timed_steps"] >= 1 and finite_positive(train["seconds_per_step"])
    assert len(train["step_seconds"]) == train["warmup_steps"] + train["timed_steps"]
    assert all(math.isfinite(loss) for loss in train["losses"])
    assert train["accumulate_grad_batches_in_config"] == 8  # the QLoRA overlay was composed
    assert train["max_allocated_gib"] is None and train["peak_rss_rise_gib"] is not None  # a CPU: RSS, not CUDA
    assert finite_positive(train["plan_total_gib"])  # plan's estimate for the same config, beside it
    assert train["plan_gib_per_device"]["total"] == train["plan_total_gib"]

    for name in ("edit_full", "edit_low", "edit_sequential", "edit_4bit", "edit_8bit"):
        edit = parts[name]
        assert finite_positive(edit["seconds_per_edit"]), name
        assert edit["output_finite"] is True, name
        assert edit["resolution"] == 64
    assert (parts["edit_4bit"]["quantization"], parts["edit_8bit"]["quantization"]) == ("4bit", "8bit")
    modes = [parts[name]["memory_mode"] for name in ("edit_full", "edit_low", "edit_sequential")]
    assert modes == ["full", "low", "sequential"]
    for name in ("edit_full", "edit_low", "edit_sequential", "edit_4bit", "edit_8bit"):  # plan --edit has these rows
        assert finite_positive(parts[name]["plan_peak_gib"]), name
    # NF4 weighs less than LLM.int8 (strictly so at full size: test_pipeline_memory); the tiny LLM's few MB
    # vanish in plan's rounding to 0.001 GiB
    assert parts["edit_4bit"]["plan_peak_gib"] <= parts["edit_8bit"]["plan_peak_gib"]


@pytest.mark.slow  # two gloo processes of the tiny stage 3: 5-9 min on 2 shared cores
def test_sharded_part_runs_over_two_cpu_processes(tmp_path):
    """The FSDP2 part's worker (Lightning fans it out to the ranks) on the CPU: what several GPUs would run."""
    results = run_check(tmp_path, "--parts", "train_sharded", "--sharded-ranks", "2", "--budget-s", "1200")
    sharded = results["parts"]["train_sharded"]
    assert "error" not in sharded and "skipped" not in sharded, sharded
    assert sharded["ranks"] == 2 and sharded["config"] == ["stage3.yaml", "fsdp2_8gpu.yaml"]
    assert finite_positive(sharded["seconds_per_step"]) and all(math.isfinite(x) for x in sharded["losses"])
    assert finite_positive(sharded["plan_total_gib"])  # plan for the same config at 2 devices
    assert results["parts"]["edit_full"]["skipped"] == "not selected (--parts)"
