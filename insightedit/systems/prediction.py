"""``insightedit predict``: edit every record of a split or a manifest and write ``<out>/<id>.png``.

The system's ``predict_step`` hands each batch to :class:`PredictionRun`, which edits it through the
:class:`~insightedit.models.editor.Editor` interface (any member, no member-specific code) and writes:

- ``<out>/<id>.png``: the edit at the source's size (the UNet works at about ``resolution``² pixels with
  the source's aspect, as ``insightedit edit`` does), written atomically: a file is whole or absent.
  This is the layout ``insightedit evaluate --pred-dir <out>`` reads.
- ``<out>/predictions.jsonl``: one line per edit in the folder (id, source image, instruction, seed, the
  sampling settings and sizes), sorted by id. Each rank appends to its own journal
  ``<out>/.predictions.rank<r>.jsonl`` while it works; at the end rank 0 merges the journals into
  ``predictions.jsonl`` (atomically) and removes them. A journal left by a crash is merged by the next run.

Noise: edit ``id`` starts from noise drawn on the CPU by a generator seeded with
:func:`record_seed` ``(id, seed)``, so an edit does not depend on the batch it is in, the number of ranks
or the accelerator's random number generator.

Resume: outputs that exist are listed before the loader is built (rank 0 lists, every rank gets the same
list) and their records are left out of the data (:meth:`AdvancedEditDataModule.skip_predictions`), so a
resumed run shards and edits only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from insightedit.atomic_write import OutputNotWritten, atomic_write, atomic_write_text, check_writable_folder, explain
from insightedit.errors import UserError
from insightedit.models.editor import Editor

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
JOURNAL_GLOB = ".predictions.rank*.jsonl"


@dataclass
class PredictSettings:
    """How ``insightedit predict`` edits and where it writes (the ``prediction:`` section of a system config).

    Args:
        out_dir: the output folder (default: ``<trainer.default_root_dir>/predictions``).
        num_inference_steps, text_guidance, image_guidance, image_scale: sampling settings (as ``edit``'s
            ``--steps``, ``--text-guidance``, ``--image-guidance``, ``--lambda``; ``image_scale`` ``None``:
            the model's own λ).
        seed: with each record's id it seeds that record's noise (:func:`record_seed`).
        resolution: the UNet's working size ≈ ``resolution``² pixels (default: the data's ``resolution``).
    """

    out_dir: str | None = None
    num_inference_steps: int = 20
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    image_scale: float | None = None
    seed: int = 0
    resolution: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> PredictSettings:
        """Settings from a config section; an unknown key or a bad value is a one-line :class:`UserError`."""
        config = dict(config or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UserError(f"prediction has no setting {', '.join(unknown)} (it has {', '.join(sorted(known))})")
        settings = cls(**config)
        if int(settings.num_inference_steps) < 1:
            raise UserError(f"prediction.num_inference_steps must be at least 1, got {settings.num_inference_steps}")
        if settings.resolution is not None and int(settings.resolution) < 1:
            raise UserError(f"prediction.resolution must be positive, got {settings.resolution}")
        return settings


def record_seed(record_id: str, seed: int = 0) -> int:
    """The noise seed of record ``record_id``: a hash of the run's seed and the id (63 bits)."""
    digest = hashlib.sha256(f"{int(seed)}\0{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def done_ids(out_dir: Path) -> set[str]:
    """Ids whose edit is already in ``out_dir`` (every ``<id>.png`` under it; temporaries are not)."""
    if not out_dir.is_dir():
        return set()
    return {path.relative_to(out_dir).as_posix()[: -len(".png")] for path in out_dir.rglob("*.png") if path.is_file()}


def size_multiple(editor: Editor) -> int:
    """Pixel sizes the editor's UNet accepts: latent downsampling × 2 per UNet downsampling block."""
    generation = editor.generation
    blocks = len(generation.unet.unet.config.block_out_channels)
    return int(generation.latent_space.downsample) * 2 ** (blocks - 1)


def merge_journals(out_dir: Path) -> int:
    """Fold the ranks' journals into ``predictions.jsonl`` (rows whose ``<id>.png`` exists, last wins).

    Returns the number of rows written; the journals are removed once the file is in place. A torn last
    line (a crash mid-write) is dropped.
    """
    rows: dict[str, dict[str, Any]] = {}
    journals = sorted(out_dir.glob(JOURNAL_GLOB))
    for path in [out_dir / PREDICTIONS_FILE, *journals]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                rows[row["id"]] = row
    present = done_ids(out_dir)
    kept = [rows[key] for key in sorted(rows) if key in present]
    if not kept and not (out_dir / PREDICTIONS_FILE).is_file():
        return 0
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in kept)
    try:
        atomic_write_text(out_dir / PREDICTIONS_FILE, text)
    except OSError as error:
        raise OutputNotWritten(f"cannot write {out_dir / PREDICTIONS_FILE}: {explain(error)}") from error
    for path in journals:
        path.unlink(missing_ok=True)
    return len(kept)


class PredictionRun:
    """One rank's share of ``insightedit predict``: edit batches, write images and journal lines."""

    def __init__(self, settings: PredictSettings, out_dir: Path, rank: int = 0) -> None:
        check_writable_folder(out_dir, "predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.out_dir = out_dir
        self.journal = out_dir / f".predictions.rank{rank}.jsonl"
        self.written = 0
        self.failed: dict[str, str] = {}
        self.skipped = 0  # records whose output existed (left out of the data, or passed over here)
        self.skip: set[str] = set()  # ids to pass over, for data that could not leave them out

    def _rows(self, batch: dict[str, Any]) -> list[int]:
        """Indices of the batch's samples to edit; unreadable ones are recorded as failed."""
        usable = []
        for index, error in enumerate(batch["error"]):
            if batch["id"][index] in self.skip:
                self.skipped += 1
            elif error is None:
                usable.append(index)
            else:
                self.failed[batch["id"][index]] = str(error)
                log.warning("predict: %s not edited: %s", batch["id"][index], error)
        return usable

    @torch.no_grad()
    def edit_batch(self, editor: Editor, batch: dict[str, Any]) -> None:
        """Edit the batch's usable samples (grouped by working size) and write each as ``<id>.png``."""
        from insightedit.pipeline.images import resize, to_pil, working_size

        settings = self.settings
        multiple = size_multiple(editor)
        dtype = next(editor.generation.unet.parameters()).dtype
        groups: dict[tuple[int, int], list[int]] = {}
        for index in self._rows(batch):
            height, width = batch["image"][index].shape[-2:]
            resolution = settings.resolution or int(batch["resolution"][index])
            groups.setdefault(working_size(int(height), int(width), multiple, resolution), []).append(index)
        views = batch["mllm_source"]
        for size, members in groups.items():
            images = [batch["image"][index].float().unsqueeze(0) / 255 for index in members]
            source = torch.cat([resize(image, size) for image in images]) * 2 - 1  # (b, 3, h, w) in [-1, 1]
            source = source.to(dtype)  # the UNet's own under a "-true" precision (mixed ones autocast)
            mllm_source = views[members] if isinstance(views, torch.Tensor) and editor.needs_mllm_view() else None
            ids = [batch["id"][index] for index in members]
            seeds = [record_seed(record_id, settings.seed) for record_id in ids]
            edited = editor.edit(
                source,
                mllm_source,
                [batch["instruction"][index] for index in members],
                image_scale=settings.image_scale,
                num_inference_steps=int(settings.num_inference_steps),
                text_guidance=settings.text_guidance,
                image_guidance=settings.image_guidance,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            )
            for row, index in enumerate(members):
                full = tuple(batch["image"][index].shape[-2:])
                back = resize(edited[row : row + 1].float(), full)[0]  # (3, H, W) at the source's size
                picture = to_pil(((back + 1) / 2).clamp(0, 1))
                self._write(ids[row], picture, batch, index, seeds[row], size)

    def _write(
        self, record_id: str, picture: Image.Image, batch: dict[str, Any], index: int, seed: int, size: tuple[int, int]
    ) -> None:
        """Journal the edit, then write its image atomically (a journal line without an image is dropped)."""
        settings = self.settings
        row = {
            "id": record_id,
            "image": batch["image_path"][index],
            "instruction": batch["instruction"][index],
            "seed": seed,
            "width": picture.width,
            "height": picture.height,
            "working_size": [size[1], size[0]],
            **{key: value for key, value in asdict(settings).items() if key not in ("out_dir", "seed", "resolution")},
        }
        path = self.out_dir / f"{record_id}.png"
        try:
            with self.journal.open("a", encoding="utf-8") as journal:
                journal.write(json.dumps(row, sort_keys=True) + "\n")
            with atomic_write(path) as stream:
                picture.save(stream, format="PNG")
        except OSError as error:
            raise OutputNotWritten(f"cannot write the edit {path}: {explain(error)}") from error
        self.written += 1


def summary_line(out_dir: Path, written: list[int], skipped: int, failed: dict[str, str], listed: int) -> str:
    """What a predict run did (``written``: edits per rank), in one line, plus one per failed record (10 at most)."""
    ranks = f" (ranks: {' + '.join(map(str, written))})" if len(written) > 1 else ""
    parts = [
        f"predict: wrote {sum(written)} edits to {out_dir}{ranks}",
        f"{skipped} skipped (their <id>.png was there)",
    ]
    if failed:
        parts.append(f"{len(failed)} failed")
    lines = [", ".join(parts) + f"; {out_dir / PREDICTIONS_FILE} lists {listed}"]
    lines += [f"  {record_id}: {reason}" for record_id, reason in sorted(failed.items())[:10]]
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more")
    return "\n".join(lines)


__all__ = [
    "PREDICTIONS_FILE",
    "PredictSettings",
    "PredictionRun",
    "done_ids",
    "merge_journals",
    "record_seed",
    "size_multiple",
    "summary_line",
]
