"""``AdvancedEditDataModule``: records, JSONL manifests or litdata shards → train/val/test/predict loaders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from insightedit.data.checking import CheckReport, enforce_bad_fraction, scan_records
from insightedit.data.dataset import EditDataset, split_by_source
from insightedit.data.images import CLIP_MEAN, CLIP_STD
from insightedit.data.manifest import (
    INSTRUCTION_CHOICES,
    PredictDataset,
    collate_predict,
    read_predict_manifest,
    records_to_predict,
)
from insightedit.data.records import detect_format, load_records
from insightedit.data.resumable import make_resumable
from insightedit.data.samples import SampleConfig, collate_samples
from insightedit.data.synthetic import SynthConfig, ensure_synthetic
from insightedit.errors import UserError

log = logging.getLogger(__name__)

PREDICT_SPLITS: tuple[str, ...] = ("train", "val", "test", "all")


class AdvancedEditDataModule(L.LightningDataModule):
    """AdvancedEdit data (official JSON layout, our JSONL manifest, or ``data optimize`` shards).

    With ``synthetic`` (``{num_images, size, seed}``) and an empty or absent ``root``, a synthetic
    AdvancedEdit dataset is generated there on first use and reused afterwards. Splits are by source
    image. Records that fail the setup check are skipped and counted; more than ``max_bad_fraction``
    of them stops with a :class:`UserError` naming files and reasons.

    ``insightedit predict`` edits either a split of these records (``predict_split``: ``train``, ``val``,
    ``test`` (``val`` when ``test_fraction`` is 0, as ``insightedit test``) or ``all``; each record's source
    with its first plain or reasoning instruction, as ``predict_instruction`` says) or the images a
    prediction manifest names (``predict_manifest``, a JSONL or CSV file of ``id, image, instruction``,
    images under ``predict_images``; see :mod:`insightedit.data.manifest`), whole, at ``resolution``²
    pixels with their aspect. With a manifest the records are not read (nor a synthetic set generated).
    """

    def __init__(
        self,
        root: str | None = None,
        synthetic: dict[str, int] | None = None,
        resolution: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        reasoning_probability: float = 0.5,
        max_bad_fraction: float = 0.05,
        clip_size: int = 224,
        clip_mean: tuple[float, float, float] = CLIP_MEAN,
        clip_std: tuple[float, float, float] = CLIP_STD,
        mllm_size: int = 336,
        mllm_mean: tuple[float, float, float] = CLIP_MEAN,
        mllm_std: tuple[float, float, float] = CLIP_STD,
        seed: int = 0,
        image_root: str | None = None,
        target_root: str | None = None,
        check_images: bool = True,
        pin_memory: bool = False,
        predict_split: str | None = None,
        predict_manifest: str | None = None,
        predict_images: str | None = None,
        predict_instruction: str = "plain",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if root is None and synthetic is None:
            raise UserError("AdvancedEditDataModule needs a root, a synthetic config, or both")
        self.synthetic = SynthConfig(**synthetic) if synthetic else None
        if root is None and self.synthetic is not None:
            s = self.synthetic
            root = f"data/synthetic-n{s.num_images}-s{s.size}-seed{s.seed}"
        self.root = Path(root)  # type: ignore[arg-type]
        self.sample_config = SampleConfig(
            resolution=resolution, clip_size=clip_size, clip_mean=clip_mean, clip_std=clip_std,
            mllm_size=mllm_size, mllm_mean=mllm_mean, mllm_std=mllm_std,
            reasoning_probability=reasoning_probability,
        )  # fmt: skip
        self.report: CheckReport | None = None
        self.datasets: dict[str, Any] = {}
        if predict_split is not None and predict_split not in PREDICT_SPLITS:
            raise UserError(f"predict_split must be one of {', '.join(PREDICT_SPLITS)}, got {predict_split!r}")
        if predict_instruction not in INSTRUCTION_CHOICES:
            raise UserError(f"predict_instruction must be plain or reasoning, got {predict_instruction!r}")
        if predict_split is not None and predict_manifest is not None:
            raise UserError("give predict_split or predict_manifest, not both")
        if predict_images is not None and predict_manifest is None:
            raise UserError("predict_images names the folder of a predict_manifest's images: give the manifest too")
        self.predict_dataset: PredictDataset | None = None
        self.predict_skipped = 0  # records left out of the predict loader because their outputs exist

    def _has_data(self) -> bool:
        return self.root.exists() and (self.root.is_file() or any(self.root.iterdir()))

    def _predicting_from_manifest(self) -> bool:
        trainer = getattr(self, "trainer", None)
        predicting = trainer is not None and getattr(trainer.state.fn, "value", None) == "predict"
        return predicting and self.hparams.predict_manifest is not None

    def prepare_data(self) -> None:
        """Generate the synthetic dataset on first use (local rank 0 only, as Lightning calls it)."""
        if self._predicting_from_manifest():
            return
        if self.synthetic is not None and (not self._has_data() or (self.root / "synthetic.json").is_file()):
            try:
                ensure_synthetic(self.root, self.synthetic)
            except (FileExistsError, ValueError) as error:
                raise UserError(str(error)) from None
        elif not self._has_data():
            raise UserError(f"dataset root {self.root} does not exist or is empty")

    def setup(self, stage: str | None = None) -> None:
        """Load, check and split the records (or open the streaming shards); ``predict``: the edits to make."""
        if stage == "predict":
            self.setup_predict()
            return
        if self.datasets:
            return
        if self.synthetic is not None and not self._has_data():
            self.prepare_data()
        hp = self.hparams
        if detect_format(self.root) == "streaming":
            from insightedit.data.streaming import StreamingEditDataset

            for split in ("train", "val", "test"):
                if (self.root / split / "index.json").is_file():
                    self.datasets[split] = StreamingEditDataset(
                        str(self.root / split), self.sample_config, shuffle=split == "train", seed=hp.seed
                    )
            return
        records = load_records(self.root, image_root=hp.image_root, target_root=hp.target_root)
        self.report = scan_records(records, full=False) if hp.check_images else None
        if self.report is not None:
            enforce_bad_fraction(self.report, hp.max_bad_fraction)
            if self.report.bad:
                log.warning("skipped %d bad records:\n%s", len(self.report.bad), self.report.summary(5))
        good = self.report.good if self.report is not None else list(records)
        splits = split_by_source(good, hp.val_fraction, hp.test_fraction, hp.seed)
        for name, split_records in splits.items():
            if split_records:
                self.datasets[name] = EditDataset(split_records, self.sample_config, seed=hp.seed)

    def setup_predict(self) -> None:
        """Build the edits ``predict_dataloader`` serves, from the manifest or from a split of the records."""
        if self.predict_dataset is not None:
            return
        hp = self.hparams
        if hp.predict_manifest is not None:
            records = read_predict_manifest(hp.predict_manifest, hp.predict_images)
        elif hp.predict_split is not None:
            self.setup("fit")
            if not all(isinstance(dataset, EditDataset) for dataset in self.datasets.values()):
                raise UserError(
                    f"{self.root} holds streaming shards: predict reads records (point root at them) or a manifest"
                )
            names = ("train", "val", "test") if hp.predict_split == "all" else (hp.predict_split,)
            if names == ("test",) and "test" not in self.datasets:  # as `insightedit test` does
                log.warning("no test split (test_fraction=%s): predicting the val split", hp.test_fraction)
                names = ("val",)
            if not any(name in self.datasets for name in names):
                raise UserError(f"no {hp.predict_split} split in {self.root} (val_fraction={hp.val_fraction}, "
                                f"test_fraction={hp.test_fraction})")  # fmt: skip
            chosen = [record for name in names if name in self.datasets for record in self.datasets[name].records]
            records = records_to_predict(chosen, hp.predict_instruction)
        else:
            raise UserError(
                "predict needs what to edit: --data.init_args.predict_split=test (a split of the records) or "
                "--data.init_args.predict_manifest=FILE (JSONL or CSV of id, image, instruction)"
            )
        self.predict_dataset = PredictDataset(
            records, hp.resolution, mllm_size=hp.mllm_size, mllm_mean=hp.mllm_mean, mllm_std=hp.mllm_std
        )

    def skip_predictions(self, done: set[str]) -> int:
        """Leave out of the predict loader the edits whose ids are in ``done``; return how many were left out.

        Called (by :class:`~insightedit.systems.editor_system.EditorSystem` in its ``setup``) before the
        loader is built, so a resumed run batches and shards only the edits still to make.
        """
        self.setup_predict()
        assert self.predict_dataset is not None
        before = len(self.predict_dataset)
        self.predict_dataset = self.predict_dataset.without(done)
        self.predict_skipped += before - len(self.predict_dataset)
        return before - len(self.predict_dataset)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split == "test" and "test" not in self.datasets:
            split = "val"
        if split not in self.datasets:
            raise UserError(f"no {split} split in {self.root} (val_fraction={self.hparams.val_fraction})")
        dataset = self.datasets[split]
        hp = self.hparams
        if not isinstance(dataset, EditDataset):
            from insightedit.data.streaming import streaming_loader

            return streaming_loader(dataset, hp.batch_size, hp.num_workers, drop_last=shuffle)
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            collate_fn=collate_samples,
            pin_memory=hp.pin_memory,
            drop_last=shuffle and len(dataset) > hp.batch_size,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, resumable mid-epoch and sharded per rank under DDP."""
        loader = self._loader("train", shuffle=True)
        return make_resumable(loader, self.hparams.seed) if isinstance(loader.dataset, EditDataset) else loader

    def val_dataloader(self) -> DataLoader:
        """Held-out batches (source images never seen in training)."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split, or the held-out validation split when ``test_fraction`` is 0."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The edits to make, in order (Lightning shards them over ranks without repeating any)."""
        self.setup_predict()
        hp = self.hparams
        return DataLoader(
            self.predict_dataset,  # type: ignore[arg-type]
            batch_size=hp.batch_size,
            shuffle=False,
            num_workers=hp.num_workers,
            collate_fn=collate_predict,
            pin_memory=hp.pin_memory,
        )
