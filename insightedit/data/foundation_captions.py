"""(image, caption) pairs from random synthetic scenes, streamed: the tiny CLIP foundation's data.

Scene ``i`` of a stream is drawn with ``numpy.random.default_rng([seed, stream, i])``, its image rendered
exactly (:mod:`.scenes`) at ``size`` pixels and CLIP-normalised, and one of its captions
(:func:`~insightedit.data.scene_captions.random_caption`) drawn with the same generator. Training reads
stream 0 without end, the held-out set is the first ``num_val`` scenes of stream 1: disjoint seeds, so
the same draw never lands in both (two draws may still picture the same scene by chance, as two photos may).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from insightedit.data.images import CLIP_MEAN, CLIP_STD
from insightedit.data.scene_captions import random_caption, true_captions
from insightedit.data.scenes import SHAPES, Scene, random_scene

TRAIN_STREAM, HELD_OUT_STREAM = 0, 1


def normalize_image(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> CLIP-normalised float32 (3, H, W) (``clip_preprocess`` of an image already at its size)."""
    pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).to(torch.float32) / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def shape_twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """``scene`` with one object (drawn with ``rng``) given another shape: same colour, place and size.

    ``None`` when the scene is empty or no object can change shape without repeating another's name.
    """
    choices = []
    for index, obj in enumerate(scene.objects):
        taken = {o.name for i, o in enumerate(scene.objects) if i != index}
        choices += [(index, shape) for shape in SHAPES if shape != obj.shape and f"{obj.colour} {shape}" not in taken]
    if not choices:
        return None
    index, shape = choices[int(rng.integers(len(choices)))]
    return scene.swapped(index, replace(scene.objects[index], shape=shape))


def caption_pair(
    seed: int, stream: int, index: int, size: int = 32, max_objects: int = 3, twin: bool = False
) -> dict[str, Any]:
    """Scene ``index`` of ``stream``: ``{"pixels": (3, size, size), "caption": str}``, fixed by the arguments.

    With ``twin``, the scene is the :func:`shape_twin` of scene ``index - 1`` (drawn with scene ``index``'s
    generator; scene ``index`` itself when there is none), so the pair differs from its neighbour in a
    batch by one object's shape alone.
    """
    rng = np.random.default_rng([seed, stream, index])
    scene = random_scene(rng, size, max_objects=max_objects)
    if twin and index > 0:
        previous = random_scene(np.random.default_rng([seed, stream, index - 1]), size, max_objects=max_objects)
        scene = shape_twin(previous, rng) or scene
    return {"pixels": normalize_image(scene.render()), "caption": random_caption(scene, rng)}


class CaptionStream(IterableDataset):
    """Training batches ``start, start + 1, ...`` without end; batch ``b`` holds scenes ``b * batch_size ...``.

    Each DataLoader worker renders every ``num_workers``-th batch, and the loader takes them in turn, so the
    batches (and a resumed run's, from ``start``) are the same whatever the number of workers. With
    ``shape_twins``, every second pair of the first ``shape_twins`` share of a batch is the
    :func:`shape_twin` of the pair before it: hard negatives that only the objects' shapes tell apart.
    """

    def __init__(
        self,
        seed: int,
        batch_size: int,
        size: int = 32,
        max_objects: int = 3,
        start: int = 0,
        shape_twins: float = 0.0,
    ) -> None:
        super().__init__()
        self.seed, self.batch_size, self.size, self.max_objects = seed, batch_size, size, max_objects
        self.start, self.shape_twins = start, shape_twins

    def batch(self, number: int) -> dict[str, Any]:
        """Batch ``number``: ``{"pixels": (B, 3, size, size), "caption": [B strings]}``."""
        first = number * self.batch_size
        twins = round(self.shape_twins * self.batch_size)
        pairs = [
            caption_pair(self.seed, TRAIN_STREAM, first + k, self.size, self.max_objects, twin=k < twins and k % 2 == 1)
            for k in range(self.batch_size)
        ]
        return {"pixels": torch.stack([p["pixels"] for p in pairs]), "caption": [p["caption"] for p in pairs]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        offset, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        number = self.start + offset
        while True:
            yield self.batch(number)
            number += step


def held_out_pair(seed: int, index: int, size: int = 32, max_objects: int = 3) -> dict[str, Any]:
    """:func:`caption_pair` of the held-out stream, with ``true_captions``: every caption true of its image."""
    rng = np.random.default_rng([seed, HELD_OUT_STREAM, index])
    scene = random_scene(rng, size, max_objects=max_objects)
    pair = {"pixels": normalize_image(scene.render()), "caption": random_caption(scene, rng)}
    return pair | {"true_captions": frozenset(true_captions(scene))}


def collate_held_out(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the pixels; keep the captions and their ``true_captions`` sets as lists."""
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "caption": [item["caption"] for item in items],
        "true_captions": [item["true_captions"] for item in items],
    }


class HeldOutCaptions(Dataset):
    """The first ``count`` scenes of the held-out stream, built once."""

    def __init__(self, seed: int, count: int, size: int = 32, max_objects: int = 3) -> None:
        self.items = [held_out_pair(seed, i, size, max_objects) for i in range(count)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class SceneCaptionDataModule(L.LightningDataModule):
    """Streams (CLIP-normalised image, caption) pairs of random scenes; holds out ``num_val`` scenes.

    Args:
        seed: seeds both streams (training: stream 0, held out: stream 1).
        size: image side in pixels (the tiny CLIP's 32).
        max_objects: objects per scene, 1 to this.
        batch_size: training pairs per step.
        num_val: held-out scenes; validation ranks all of them against each other in one batch.
        num_workers: DataLoader workers rendering training scenes beside the training step.
        shape_twins: share of each training batch given to pairs of scenes that differ in one object's shape
            alone (:func:`shape_twin`), 0 to 1.
    """

    def __init__(
        self,
        seed: int = 0,
        size: int = 32,
        max_objects: int = 3,
        batch_size: int = 128,
        num_val: int = 256,
        num_workers: int = 0,
        shape_twins: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= shape_twins <= 1.0:
            raise ValueError(f"shape_twins must be between 0 and 1, not {shape_twins}")
        self.save_hyperparameters()
        self.held_out: HeldOutCaptions | None = None
        self.start_batch = 0  # the first training batch (a resumed run continues the stream)

    def setup(self, stage: str | None = None) -> None:
        """Build the held-out scenes (once)."""
        if self.held_out is None:
            hp = self.hparams
            self.held_out = HeldOutCaptions(hp.seed, hp.num_val, hp.size, hp.max_objects)

    def train_dataloader(self) -> DataLoader:
        """The endless training stream, in batches (images stacked, captions as a list)."""
        hp = self.hparams
        stream = CaptionStream(
            hp.seed, hp.batch_size, hp.size, hp.max_objects, start=self.start_batch, shape_twins=hp.shape_twins
        )
        workers = hp.num_workers
        return DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        """All held-out pairs in one batch (retrieval ranks each against all the others)."""
        self.setup("validate")
        assert self.held_out is not None
        return DataLoader(self.held_out, batch_size=len(self.held_out), shuffle=False, collate_fn=collate_held_out)

    def state_dict(self) -> dict[str, Any]:
        """Where the training stream stands (saved in checkpoints): the next batch's number (one batch a step)."""
        trainer = getattr(self, "trainer", None)
        return {"next_batch": int(trainer.global_step) if trainer is not None else self.start_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream where the checkpoint left it."""
        self.start_batch = int(state_dict.get("next_batch", 0))
