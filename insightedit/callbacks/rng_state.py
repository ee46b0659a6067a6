"""RNG state in the checkpoint, and a training RNG stream that nothing between steps can perturb.

Lightning seeds once at the start of ``fit`` and saves no RNG state, so a resumed run would draw
different noise, timesteps and dropout masks than the run it continues; and validation, the sanity
check and every new DataLoader iterator draw from the same global RNG between training steps, at
points that differ between a resumed and an uninterrupted run.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA RNG states, as tensors and plain numbers.

    Plain types keep checkpoints loadable with ``torch.load(weights_only=True)`` (Lightning's default).
    """
    version, python_state, gauss = random.getstate()
    key, numpy_state, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": key, "state": torch.from_numpy(numpy_state.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` returned."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["key"], numpy["state"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCallback(Callback):
    """The training RNG stream as a function of the step alone: checkpointed, and untouched between steps.

    The states are captured at the end of every training batch and put back at the start of the next
    one, so whatever runs in between (validation, the sanity check, a new epoch's DataLoader iterator,
    which draws its base seed from the global RNG, image logging) never changes what training draws.
    The checkpoint holds the captured states and a resumed run starts its first batch from them.

    Under DDP the checkpoint holds rank 0's states and every rank resumes with them; ranks seeded
    alike (``seed_everything`` without per-rank offsets) draw alike, so that is exact.
    """

    def __init__(self) -> None:
        self._after_step: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The RNG states at the end of the last training batch (now, if none ran yet)."""
        return self._after_step if self._after_step is not None else capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the states; the resumed run's first training batch starts from them."""
        self._after_step = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Continue the stream from where the previous training batch (or the checkpoint) left it."""
        if self._after_step is not None:
            restore_rng_state(self._after_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Remember the stream as this batch leaves it."""
        self._after_step = capture_rng_state()
