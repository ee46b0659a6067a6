"""(image, question, answer) conversations about random synthetic scenes, streamed: the tiny MLLM foundation's data.

Sample ``i`` of a stream is drawn with ``numpy.random.default_rng([seed, stream, i])``: a question kind
(uniform over ``kinds``, so every kind is trained alike), then scenes until one can answer it
(:func:`~insightedit.data.scene_questions.ask`), its image rendered exactly at ``size`` pixels and
CLIP-normalised, the question and its answer, and a caption conversation of the same scene (the
alignment phase's data). Training reads stream 0 without end; the held-out set is the first ``num_val``
samples of stream 1 (disjoint seeds), kinds in turn so that each kind has the same number.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from insightedit.data.foundation_captions import HELD_OUT_STREAM, TRAIN_STREAM, normalize_image
from insightedit.data.scene_questions import CAPTION_KIND, QUESTION_KINDS, ask
from insightedit.data.scenes import random_scene
from insightedit.errors import UserError

MAX_DRAWS = 100  # scenes drawn for one sample before giving up on its kind (the rarest kind fits ~1 in 3)


def conversation(
    seed: int,
    stream: int,
    index: int,
    kinds: Sequence[str],
    size: int = 32,
    max_objects: int = 3,
    kind: str | None = None,
) -> dict[str, Any]:
    """Sample ``index`` of ``stream``, a pure function of its arguments.

    ``{"pixels": (3, size, size), "question", "answer", "kind", "caption_question", "caption"}``;
    ``kind`` fixes the question kind (default: drawn from ``kinds``).
    """
    rng = np.random.default_rng([seed, stream, index])
    if kind is None:
        kind = kinds[int(rng.integers(len(kinds)))]
    for _ in range(MAX_DRAWS):
        scene = random_scene(rng, size, max_objects=max_objects)
        asked = ask(scene, kind, rng)
        if asked is not None:
            break
    else:
        raise UserError(f"data: no scene of {size} px with up to {max_objects} objects answered a {kind!r} question")
    caption = ask(scene, CAPTION_KIND, rng)
    assert caption is not None
    return {
        "pixels": normalize_image(scene.render()),
        "question": asked.question,
        "answer": asked.answer,
        "kind": asked.kind,
        "caption_question": caption.question,
        "caption": caption.answer,
    }


class ConversationStream(IterableDataset):
    """Samples ``start, start + step, ...`` of the training stream without end (each worker takes its share)."""

    def __init__(self, seed: int, kinds: Sequence[str], size: int = 32, max_objects: int = 3) -> None:
        super().__init__()
        self.seed, self.kinds, self.size, self.max_objects = seed, tuple(kinds), size, max_objects

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        index, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        while True:
            yield conversation(self.seed, TRAIN_STREAM, index, self.kinds, self.size, self.max_objects)
            index += step


class HeldOutConversations(Dataset):
    """The first ``count`` samples of the held-out stream, kinds in turn, built once."""

    def __init__(self, seed: int, count: int, kinds: Sequence[str], size: int = 32, max_objects: int = 3) -> None:
        self.items = [
            conversation(seed, HELD_OUT_STREAM, i, kinds, size, max_objects, kind=kinds[i % len(kinds)])
            for i in range(count)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class SceneQuestionDataModule(L.LightningDataModule):
    """Streams (CLIP-normalised image, question, answer, caption) samples of random scenes; holds out ``num_val``.

    Args:
        seed: seeds both streams (training: stream 0, held out: stream 1).
        size: image side in pixels (the tiny LLaVA's 32).
        max_objects: objects per scene, 1 to this.
        kinds: question kinds (default: all of :data:`~insightedit.data.scene_questions.QUESTION_KINDS`).
        batch_size: training samples per step.
        num_val: held-out samples (an equal share per kind).
        val_batch_size: held-out samples per validation batch.
        num_workers: DataLoader workers rendering training scenes beside the training step.
    """

    def __init__(
        self,
        seed: int = 0,
        size: int = 32,
        max_objects: int = 3,
        kinds: list[str] | None = None,
        batch_size: int = 64,
        num_val: int = 512,
        val_batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.kinds = tuple(kinds or QUESTION_KINDS)
        unknown = [k for k in self.kinds if k not in QUESTION_KINDS]
        if unknown:
            raise UserError(f"data.kinds: unknown question kinds {unknown}; choose from {QUESTION_KINDS}")
        self.held_out: HeldOutConversations | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build the held-out samples (once)."""
        if self.held_out is None:
            hp = self.hparams
            self.held_out = HeldOutConversations(hp.seed, hp.num_val, self.kinds, hp.size, hp.max_objects)

    def train_dataloader(self) -> DataLoader:
        """The endless training stream, in batches (images stacked, texts as lists)."""
        hp = self.hparams
        stream = ConversationStream(hp.seed, self.kinds, hp.size, hp.max_objects)
        workers = hp.num_workers
        return DataLoader(
            stream, batch_size=hp.batch_size, num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        """The held-out samples in order."""
        self.setup("validate")
        assert self.held_out is not None
        return DataLoader(self.held_out, batch_size=self.hparams.val_batch_size, shuffle=False)
