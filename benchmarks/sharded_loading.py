"""Peak host memory per rank at the start of an FSDP2 run, loading before vs after sharding.

Two gloo processes on the CPU run ``insightedit fit`` (``FSDP2Strategy``, ``--trainer.devices=2``) for one
step of the tiny stage-3 InsightEdit whose LLaVA is read from a *large* folder this script writes once
(``--llava-layers`` decoder layers 1024 wide, random weights, float32 safetensors): the pretrained part
is what the two loading paths treat differently, so it dominates. Each run is made twice:

- ``before``: ``--model.init_args.sharding.load_after_sharding=false``: every rank builds the system and
  reads every pretrained weight, then ``configure_model`` shards (what every run did before meta-first
  loading);
- ``after``: the default: the CLI defers the loading step, rank 0 alone reads the weights after sharding
  and broadcasts them into the shards (:mod:`insightedit.training.sharded_loading`).

:class:`PeakHostMemory` (a callback the runs add) reads each rank's peak resident set (``VmHWM`` from
``/proc/self/status``) when training starts (build, load, shard, optimizer) and after the first step.
Results: ``benchmarks/results/sharded_loading.{json,md}`` (with the command, commit and date).

    python benchmarks/sharded_loading.py            # ~1.5 GiB of weights in /tmp, 4 runs of 2 processes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))
GiB = 1024**3
SYNTHETIC = {"num_images": 4, "size": 32, "seed": 0}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class PeakHostMemory(Callback):
    """Write each rank's peak RSS at the start of training and after the first step to ``<folder>/rank<N>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.start = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Built, loaded, sharded, optimizer made: the start."""
        self.start = peak_rss_bytes()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the first step: the peak through it."""
        if batch_idx == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            record = {"rank": trainer.global_rank, "start": self.start, "first_step": peak_rss_bytes()}
            (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def write_large_llava(folder: Path, layers: int) -> Path:
    """The tiny LLaVA with a wider, deeper language model (1024 wide, ``layers`` layers), saved once."""
    import torch

    from insightedit.models.comprehension.presets import tiny_llava_config, train_tiny_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tokenizer = train_tiny_tokenizer()
    config = tiny_llava_config(tokenizer)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 1024, 2816, layers
    text.num_attention_heads = text.num_key_value_heads = 16
    text.head_dim = 64
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    staging = folder.with_name(folder.name + ".partial")
    tokenizer.save_pretrained(str(staging))
    model.save_pretrained(str(staging))
    staging.rename(folder)
    return folder


def run_config(root: Path, llava: Path, callback_folder: Path) -> Path:
    """tiny/stage3.yaml: one step of batch 1, no validation, checkpoints or logger; the large LLaVA; the callback."""
    config = yaml.safe_load((REPO / "lightning_configs" / "tiny" / "stage3.yaml").read_text())
    model = config["model"]["init_args"]
    model.setdefault("comprehension", {})["pretrained"] = str(llava)
    for section, key in (("generation", "pretrained"), ("generation", "text_encoder"), ("bridging", "clip_pretrained")):
        (model.get(section) or {}).pop(key, None)  # the tiny foundations: not needed to compare the two paths
    trainer = config["trainer"]
    trainer.update(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                   logger=False, enable_checkpointing=False, default_root_dir=str(callback_folder / "run"))  # fmt: skip
    callback = {"class_path": "sharded_loading.PeakHostMemory", "init_args": {"folder": str(callback_folder)}}
    trainer["callbacks"] = [callback]
    data = config["data"]["init_args"]
    data.update(synthetic=dict(SYNTHETIC), batch_size=1, num_workers=0, root=str(root / "data"))
    path = callback_folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def measure(root: Path, llava: Path, after: bool, repeat: int) -> dict[str, Any]:
    """One 2-process ``fit`` of one step; each rank's peak RSS (GiB) at the start and through the first step."""
    name = f"{'after' if after else 'before'}-{repeat}"
    folder = root / name
    config = run_config(root, llava, folder)
    command = [sys.executable, "-m", "insightedit", "fit", "--config", str(config),
               "--trainer.strategy.class_path=insightedit.training.sharding.FSDP2Strategy", "--trainer.devices=2",
               "--trainer.accelerator=cpu", "--trainer.precision=32-true",
               f"--model.init_args.sharding.load_after_sharding={'true' if after else 'false'}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO)])}  # fmt: skip
    started = time.perf_counter()
    run = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{run.stderr[-4000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in folder.glob("rank*.json")), key=lambda r: r["rank"])
    return {
        "path": "after" if after else "before",
        "seconds": round(seconds, 1),
        "ranks": [{"rank": r["rank"], "start_gib": round(r["start"] / GiB, 3),
                   "first_step_gib": round(r["first_step"] / GiB, 3)} for r in ranks],  # fmt: skip
        "command": " ".join(command[1:]),
    }


def weight_bytes(llava: Path) -> int:
    """Bytes of the LLaVA folder's safetensors (what a full read brings into memory, float32)."""
    return sum(p.stat().st_size for p in llava.glob("*.safetensors"))


def markdown(result: dict[str, Any]) -> str:
    """The table of ``result`` with how it was measured."""
    lines = [
        "# Peak host RSS per rank at start: pretrained weights loaded before vs after sharding",
        "",
        f"`{result['command']}` — commit `{result['commit']}`, {result['date']}.",
        "",
        f"2 gloo processes on the CPU, `insightedit fit` of one step with `FSDP2Strategy`: the tiny stage-3 "
        f"InsightEdit whose LLaVA ({result['llava_parameters'] / 1e6:.0f} M parameters, "
        f"{result['weight_gib']:.2f} GiB of float32 safetensors) is read from a folder. `start`: peak RSS "
        "when training starts (built, loaded, sharded, optimizer made); `first step`: peak through step 1. "
        f"Each path run {result['repeats']} time(s); the table shows each rank's largest value over them.",
        "",
        "| path | rank | start (GiB) | first step (GiB) |",
        "|---|---|---|---|",
    ]
    for path, ranks in result["summary"].items():
        for rank in ranks:
            lines.append(f"| {path} | {rank['rank']} | {rank['start_gib']:.2f} | {rank['first_step_gib']:.2f} |")
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write the folder, measure both paths ``--repeats`` times, write the results."""
    from provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/insightedit-sharded-loading"))
    parser.add_argument("--llava-layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "sharded_loading")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    llava = write_large_llava(args.root / f"llava-{args.llava_layers}", args.llava_layers)
    from insightedit.data.synthetic import SynthConfig, ensure_synthetic

    ensure_synthetic(args.root / "data", SynthConfig(**SYNTHETIC))  # once, before two ranks could race to it
    runs = [measure(args.root, llava, after, repeat) for repeat in range(args.repeats) for after in (False, True)]
    summary: dict[str, list[dict[str, Any]]] = {}
    for path in ("before", "after"):
        ranks: dict[int, dict[str, Any]] = {}
        for run in (r for r in runs if r["path"] == path):
            for rank in run["ranks"]:
                best = ranks.setdefault(rank["rank"], dict(rank))
                best["start_gib"] = max(best["start_gib"], rank["start_gib"])
                best["first_step_gib"] = max(best["first_step_gib"], rank["first_step_gib"])
        summary[path] = [ranks[r] for r in sorted(ranks)]
    from safetensors import safe_open

    parameters = 0
    for file in llava.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            parameters += sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    result = {
        **provenance(),
        "llava_layers": args.llava_layers,
        "repeats": args.repeats,
        "llava_parameters": parameters,
        "weight_gib": round(weight_bytes(llava) / GiB, 3),
        "runs": runs,
        "summary": summary,
        "note": (
            "At start, before: every rank holds the whole loaded model until configure_model shards it; after: "
            "rank 0 holds it once (it reads the files) together with its shard, every other rank only its "
            "shard and one tensor in flight. With N ranks the before-total grows as N full copies, the "
            "after-total as one copy plus N shards. The first step adds its own working set (gathered blocks, "
            "activations, LoRA gradients through every layer) on every rank, so through step 1 the ranks "
            "other than 0 end near the before-path's peak on this small model; at 7B the model is the larger part."
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


if __name__ == "__main__":
    raise SystemExit(main())
