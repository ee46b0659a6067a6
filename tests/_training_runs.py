"""Helpers for the training tests: a small tiny-stage-3 config and a subprocess ``insightedit fit``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from insightedit.data.synthetic import SynthConfig, ensure_synthetic

REPO = Path(__file__).resolve().parents[1]
TINY3 = REPO / "lightning_configs" / "tiny" / "stage3.yaml"


def small_config(
    root: Path,
    name: str,
    *,
    max_steps: int,
    every: int,
    batch_size: int = 2,
    epoch_batches: int | None = None,
    logger: bool = False,
    extra_callbacks: list[dict] | None = None,
) -> Path:
    """tiny/stage3.yaml with few steps, a small synthetic set and its run folder under ``root/name``."""
    config = yaml.safe_load(TINY3.read_text())
    trainer = config["trainer"]
    trainer.update(
        max_steps=max_steps,
        val_check_interval=every,
        limit_val_batches=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
        num_sanity_val_steps=1,
        default_root_dir=str(root / name),
        limit_train_batches=epoch_batches,
    )
    if not logger:  # CSV is cheaper to start than W&B; edited images then go to <run>/edits/*.png
        trainer["logger"] = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(root / name), "name": "logs"},
        }
    for callback in trainer["callbacks"]:
        args = callback.setdefault("init_args", {})
        if callback["class_path"].endswith("ModelCheckpoint"):
            args["every_n_train_steps"] = every
        if callback["class_path"].endswith("EditImageLogger"):
            args.update(every_n_steps=every, num_images=2, num_inference_steps=3)
    trainer["callbacks"] += extra_callbacks or []
    data = config["data"]["init_args"]
    data.update(synthetic={"num_images": 16, "size": 32, "seed": 0}, batch_size=batch_size, root=str(root / "data"))
    if not (root / "data").is_dir():  # generated once here, so concurrent runs never race to create it
        ensure_synthetic(root / "data", SynthConfig(**data["synthetic"]))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit_command(config: Path, *extra: str) -> list[str]:
    """The ``insightedit fit`` command line for ``config`` in a fresh interpreter."""
    return [sys.executable, "-m", "insightedit", "fit", "--config", str(config), *extra]


def environment() -> dict[str, str]:
    """Offline, one thread (the same in every run, so float reductions agree; see conftest), tests importable."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]),
    )
    env.pop("INSIGHTEDIT_DEBUG", None)
    return env


def run_fit(config: Path, cwd: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``insightedit fit`` to completion; fail the test with its output if it fails."""
    result = subprocess.run(
        fit_command(config, *extra), cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


class RecordRanks(Callback):
    """Test probe: per rank, the batches trained on and the trainable weights before and after."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.sources: list[torch.Tensor] = []
        self.instructions: list[str] = []
        self.before: dict[str, torch.Tensor] = {}

    def _weights(self, pl_module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = self._weights(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sources.append(batch["source"].detach().clone())
        self.instructions += list(batch["instruction"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "rank": trainer.global_rank,
                "world": trainer.world_size,
                "sources": self.sources,
                "instructions": self.instructions,
                "before": self.before,
                "after": self._weights(pl_module),
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


class RecordShards(Callback):
    """Test probe for sharded (FSDP2) runs: per rank, how each parameter is sharded, and gathered weights.

    Saves ``<out_dir>/rank<r>.pt`` with ``layout`` (name -> (is DTensor, placements, local numel, numel,
    requires_grad)) at the start of training, the full (gathered) weights ``before`` (after any resume)
    and ``after``, the gathered trainable weights after each optimizer step (``steps``), the batches
    and the losses.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.layout: dict[str, tuple] = {}
        self.before: dict[str, torch.Tensor] = {}
        self.steps: dict[int, dict[str, torch.Tensor]] = {}
        self.sources: list[torch.Tensor] = []
        self.losses: dict[int, float] = {}

    @staticmethod
    def _gathered(pl_module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p in pl_module.named_parameters():  # same order on every rank: full_tensor() is collective
            if trainable_only and not p.requires_grad:
                continue
            out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        return out

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        for name, p in pl_module.named_parameters():
            sharded = isinstance(p, DTensor)
            placements = tuple((type(x).__name__, getattr(x, "dim", None)) for x in p.placements) if sharded else ()
            self.layout[name] = (
                sharded,
                placements,
                p.to_local().numel() if sharded else p.numel(),
                p.numel(),
                p.requires_grad,
            )
        self.before = self._gathered(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sources.append(batch["source"].detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.steps[trainer.global_step] = self._gathered(pl_module, trainable_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        after = self._gathered(pl_module)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "rank": trainer.global_rank,
                "world": trainer.world_size,
                "layout": self.layout,
                "before": self.before,
                "after": after,
                "steps": self.steps,
                "sources": self.sources,
                "losses": self.losses,
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )
