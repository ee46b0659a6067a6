"""Every member of the zoo trains exactly what its stage says and edits the same after a checkpoint round trip.

For each member in :data:`insightedit.models.zoo.MEMBERS`, built once (tiny, small sizes) as an
:class:`EditorSystem` of stage 3: two Lightning steps on 32 px synthetic data change exactly the
parameters of the stage's groups (by name, and as many as the groups hold), every other weight and
buffer stays bit for bit, and ``trainer.save_checkpoint`` → ``EditorSystem.load_from_checkpoint`` edits
exactly as the trained system does; the image logger writes the trained member's edits; ``insightedit test``
on that checkpoint scores the member's edits (the command line's evaluation settings, not the checkpoint's).
Stage 1 of every member with an MLLM trains no UNet.

Two steps, not one: tensors behind a zero-initialised factor (LoRA's A behind B = 0, the BIM's transformer
behind its zero heads) get their first gradient in the second step. The whole file takes about 75 s on
one thread of two loaded cores, 30 s of it the six ``insightedit test`` runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from insightedit.callbacks.image_logging import EditImageLogger, triptychs
from insightedit.data.datamodule import AdvancedEditDataModule
from insightedit.data.synthetic import SynthConfig, synthesize
from insightedit.models.zoo import MEMBERS, get_member
from insightedit.systems.editor_system import EditorSystem

NO_DROPOUT = {"drop_text_prob": 0.0, "drop_source_prob": 0.0, "drop_both_prob": 0.0}
SIZES: dict[str, dict[str, Any]] = {  # small twins of the tiny preset; each member takes the sections it reads
    "comprehension": {"num_mm_tokens": 4, "lora_rank": 2, "lora_alpha": 4, "lora_dropout": 0.0},
    "generation": {"unet_config": {"block_out_channels": (32, 64), "norm_num_groups": 8}, **NO_DROPOUT},
    "head": {"expressive_tokens": 2},
}
STEPS = 2


def _available(member: str) -> bool:
    """Whether the member's code is in this checkout (a member being written elsewhere may not be yet)."""
    module = get_member(member).builder.partition(":")[0]
    return importlib.util.find_spec(module) is not None


def _params(members: list[str]) -> list[Any]:
    return [
        pytest.param(m, marks=pytest.mark.skipif(not _available(m), reason=f"{m}'s module is not in this checkout"))
        for m in members
    ]


MLLM_MEMBERS = [name for name, entry in MEMBERS.items() if "comprehension" in entry.sections]


def build(member: str, stage: int) -> EditorSystem:
    """``member`` of the tiny preset at ``stage``, with the small sizes of :data:`SIZES`.

    Every learning rate is 1e-3, so that two steps move the edit measurably.
    """
    entry = get_member(member)
    sections = {name: SIZES[name] for name in entry.sections if name in SIZES}
    rates = {"learning_rates": {group: 1e-3 for group in entry.editor_class().optimizer_groups}}
    torch.manual_seed(0)
    return EditorSystem(member=member, preset="tiny", stage=stage, stage_settings=rates, **sections)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "data"
    synthesize(root, SynthConfig(num_images=3, size=32, seed=5))
    return root


def datamodule(root: Path, system: EditorSystem) -> AdvancedEditDataModule:
    """Batches of 2 with every key a member reads (``mllm_source`` at the MLLM's size, ``clip_target``...)."""
    size = system.editor.mllm_image_size() or 32
    return AdvancedEditDataModule(
        root=str(root),
        resolution=32,
        clip_size=32,
        mllm_size=size,
        batch_size=2,
        num_workers=0,
        val_fraction=0.3,  # one of the three images: the image logger's held-out batch
        check_images=False,
    )


def train_loader(root: Path, system: EditorSystem) -> DataLoader:
    """The training batches of :func:`datamodule`."""
    data = datamodule(root, system)
    data.setup("fit")
    return data.train_dataloader()


def state(system: EditorSystem) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, copied."""
    named = {**dict(system.named_parameters()), **dict(system.named_buffers())}
    return {name: tensor.detach().clone() for name, tensor in named.items()}


@torch.no_grad()
def an_edit(system: EditorSystem) -> torch.Tensor:
    """A seeded two-step edit of two fixed images (the MLLM view at the member's size, if it has one)."""
    g = torch.Generator().manual_seed(11)
    source = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    size = system.editor.mllm_image_size()
    mllm_source = torch.randn(2, 3, size, size, generator=g) if size else None
    system.eval()
    return system.edit(
        source,
        mllm_source,
        ["remove the red circle", "turn the blue square green"],
        num_inference_steps=2,
        text_guidance=2.0,
        image_guidance=1.5,
        generator=torch.Generator().manual_seed(3),
    )


@dataclass
class Run:
    """One member after a stage-3 fit: the system, its state before and after, a checkpoint, an edit, the logger."""

    member: str
    system: EditorSystem
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    checkpoint: Path
    edited: torch.Tensor
    logger: EditImageLogger
    folder: Path


@pytest.fixture(scope="module", params=_params(list(MEMBERS)))
def run(request: pytest.FixtureRequest, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    member = request.param
    system = build(member, stage=3)
    before = state(system)
    folder = tmp_path_factory.mktemp(member)
    logger = EditImageLogger(every_n_steps=STEPS, num_images=2, num_inference_steps=2, seed=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        callbacks=[logger],
        default_root_dir=folder,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(system, datamodule=datamodule(data_root, system))
    assert trainer.global_step == STEPS
    checkpoint = folder / "trained.ckpt"
    trainer.save_checkpoint(checkpoint)
    return Run(member, system, before, state(system), checkpoint, an_edit(system), logger, folder)


def test_a_stage3_fit_changes_exactly_the_parameters_of_the_stage_groups(run: Run) -> None:
    system = run.system
    stage = system.stage
    defaults = get_member(run.member).editor_class().stages[3]
    assert (stage.name, stage.train) == (defaults["name"], tuple(defaults["train"]))
    groups = system.parameter_groups()
    assert set(groups) == set(system.editor.groups)
    in_groups = [name for group in stage.train for name in groups[group]]
    assert len(in_groups) == len(set(in_groups)), "a parameter is in two groups"
    assert all(groups[group] for group in stage.train), "a trained group holds no parameters"
    trainable = system.trainable_names()
    assert trainable == set(in_groups)
    assert len(trainable) == sum(len(groups[group]) for group in stage.train)
    changed = {name for name, value in run.after.items() if not torch.equal(value, run.before[name])}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    # every trained tensor moved, except attention key biases: softmax ignores a shift shared by all keys,
    # so their gradient is zero up to rounding (SAM's last token-to-image attention: exactly zero)
    unmoved = trainable - changed
    assert all(name.endswith("k_proj.bias") for name in unmoved), sorted(unmoved)[:5]
    assert len(unmoved) <= 1, sorted(unmoved)


def test_the_image_logger_writes_the_trained_member_s_edit_of_its_held_out_batch(run: Run, tmp_path: Path) -> None:
    batch = run.logger._batch
    assert batch is not None and len(batch["instruction"]) == 2
    run.system.eval()
    edited = run.system.edit(  # what the logger ran after the last step, with the same seed and steps
        batch["source"],
        batch["mllm_source"],
        batch["instruction"],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(4),
    )
    expected = np.concatenate(triptychs(batch["source"], edited, batch["target"]), axis=0)
    written = np.asarray(Image.open(run.folder / "edits" / f"step_{STEPS:06d}.png"))
    assert np.array_equal(written, expected)
    if run.system.editor.mllm is None:  # held-out data without the MLLM's view: the logger passes None
        held_out = {key: value for key, value in batch.items() if key != "mllm_source"}
        logger = EditImageLogger(num_images=2, num_inference_steps=2, seed=4)
        trainer = SimpleNamespace(
            datamodule=SimpleNamespace(val_dataloader=lambda: [held_out]),
            is_global_zero=True,
            strategy=None,
            global_step=7,
            loggers=[],
            default_root_dir=str(tmp_path),
        )
        logger.on_fit_start(trainer, run.system)  # type: ignore[arg-type]
        logger.log_edits(trainer, run.system)  # type: ignore[arg-type]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "edits" / "step_000007.png")), expected)


@pytest.mark.parametrize("member", _params(list(MEMBERS)))
def test_learning_rate_groups_cover_each_trainable_group_once(member: str) -> None:
    editor = get_member(member).editor_class()
    listed = [group for groups in editor.optimizer_groups.values() for group in groups]
    assert sorted(listed) == sorted(editor.groups)
    for number, stage in editor.stages.items():
        assert set(stage["train"]) <= set(editor.groups), number
        assert set(stage["learning_rates"]) == set(editor.optimizer_groups), number


def test_frozen_weights_and_buffers_are_bit_identical(run: Run) -> None:
    frozen = set(run.before) - run.system.trainable_names()
    assert any(name.startswith("editor.generation.text_encoder.") for name in frozen)
    if run.system.editor.mllm is not None:  # the MLLM's base stays: only LoRA and the new rows train
        assert any("base_layer" in name for name in frozen)
    for name in frozen:
        assert torch.equal(run.after[name], run.before[name]), name


def test_a_checkpoint_loads_back_into_the_same_edit(run: Run) -> None:
    saved = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    assert saved["insightedit"]["member"] == run.member
    assert set(saved["state_dict"]) == run.system.saved_names()  # the trained weights (+ drawn buffers) only
    assert not any(".text_encoder." in name or "base_layer" in name for name in saved["state_dict"])
    loaded = EditorSystem.load_from_checkpoint(run.checkpoint, map_location="cpu")
    assert loaded.hparams["member"] == run.member
    loaded_state = state(loaded)
    assert loaded_state.keys() == run.after.keys()
    for name, value in loaded_state.items():  # trained weights from the file, frozen ones rebuilt the same
        assert torch.equal(value, run.after[name]), name
    assert torch.equal(an_edit(loaded), run.edited)
    # and the edit depends on what was trained: the same system with its weights from before the fit
    with torch.no_grad():
        for name, tensor in {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}.items():
            tensor.copy_(run.before[name])
    assert (an_edit(loaded) - run.edited).abs().max() > 1e-4


@pytest.mark.parametrize("member", _params(MLLM_MEMBERS))
def test_stage1_of_an_mllm_member_trains_no_unet(member: str, data_root: Path) -> None:
    system = build(member, stage=1)
    assert not system.stage.use_unet and system.stage.weight("diff") == 0
    assert "unet" not in system.stage.train
    trainable = system.trainable_names()
    assert trainable and not any(name.startswith("editor.generation.") for name in trainable)
    before = state(system)
    batch = next(iter(train_loader(data_root, system)))
    optimizer = system.configure_optimizers()["optimizer"]
    system.train()
    losses = system.compute_losses(batch)
    assert "diff" not in losses and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    optimizer.step()
    after = state(system)
    changed = {name for name, value in after.items() if not torch.equal(value, before[name])}
    assert changed and changed <= trainable
    unet = [name for name in after if name.startswith("editor.generation.unet.")]
    assert unet and all(torch.equal(after[name], before[name]) for name in unet)


# ----------------------------------------------------------------------- insightedit test, every member
STALE_EVALUATION = {"num_inference_steps": 20, "lpips": "stlpips", "out_dir": "stale-report"}


def test_test_and_predict_settings_stay_out_of_the_hyperparameters() -> None:
    system = EditorSystem(member="instruct_pix2pix", preset="tiny", evaluation={"num_inference_steps": 3})
    assert system.evaluation == {"num_inference_steps": 3}  # what insightedit test reads
    assert "evaluation" not in system.hparams and "prediction" not in system.hparams
    assert system.hparams["member"] == "instruct_pix2pix"


def test_insightedit_test_scores_the_member_s_checkpoint_with_the_command_line_s_evaluation(
    run: Run, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``insightedit test --config tiny/<member>.yaml --ckpt_path <the fit's checkpoint>``, in process.

    (InsightEdit's yaml is ``tiny/stage3.yaml``.) One batch of 2 held-out pairs, 2 sampling steps, 32 px.

    The checkpoint is the one :func:`run` saved, as a file of ``insightedit fit`` written before evaluation
    settings were left out of the hyperparameters would be: it names its class and holds a stale
    ``evaluation`` section, which must not hide the command line's. InstructPix2Pix's is kept as saved
    (a system built in Python names no class): the config's model class reads it. The report is checked
    by value (finite, the identity edit exact) and the saved edits are the trained system's, pixel for pixel.
    """
    from insightedit.cli import main
    from insightedit.evaluation.metrics import PSNR_CAP_DB
    from insightedit.evaluation.model_test import to_pil

    monkeypatch.chdir(tmp_path)
    checkpoint = run.checkpoint
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert "evaluation" not in saved["hyper_parameters"]  # run settings stay out of checkpoints
    if run.member != "instruct_pix2pix":
        saved["hyper_parameters"].update(
            _class_path="insightedit.systems.editor_system.EditorSystem", evaluation=STALE_EVALUATION
        )
        checkpoint = tmp_path / "older.ckpt"
        torch.save(saved, checkpoint)
    out = tmp_path / "report"
    size = run.system.editor.mllm_image_size() or 32
    data = {"root": data_root, "synthetic": "null", "batch_size": 2, "val_fraction": 0.3, "check_images": "false",
            "mllm_size": size, "clip_size": 32, "resolution": 32}  # fmt: skip
    evaluation = {"num_inference_steps": 2, "lpips": "none", "resolution": 32, "out_dir": out}
    tiny = Path(__file__).resolve().parents[1] / "lightning_configs" / "tiny"
    config = tiny / ("stage3.yaml" if run.member == "insightedit" else f"{run.member}.yaml")  # as benchmarks/zoo.py
    batches: list[dict[str, Any]] = []  # what test_step is given (the test split's phrasing is drawn per epoch)
    test_step = EditorSystem.test_step
    monkeypatch.setattr(
        EditorSystem, "test_step", lambda self, batch, i: batches.append(batch) or test_step(self, batch, i)
    )
    code = main([
        "test", "--config", str(config), "--ckpt_path", str(checkpoint),
        *(f"--data.init_args.{key}={value}" for key, value in data.items()),
        *(f"--model.init_args.evaluation.{key}={value}" for key, value in evaluation.items()),
        "--trainer.limit_test_batches=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.out[-2000:] + printed.err[-3000:]
    assert not (tmp_path / "stale-report").exists()
    report = json.loads((out / "test_report.json").read_text())
    settings = report["settings"]
    assert (settings["num_inference_steps"], settings["lpips"], settings["resolution"]) == (2, "none", 32)
    assert set(report["systems"]) == {"this checkpoint", "identity edit"}
    model, identity = report["systems"]["this checkpoint"]["all"], report["systems"]["identity edit"]["all"]
    assert model["n"] == identity["n"] == 2
    for name in ("psnr", "ssim", "psnr_target", "ssim_target", "psnr_in_mask"):
        assert math.isfinite(model[name]) and math.isfinite(identity[name]), name
    # the identity edit is the source: infinite PSNR (reported at the cap, every image counted as capped)
    assert identity["psnr"] == PSNR_CAP_DB and identity["psnr_n_capped"] == 2
    assert identity["ssim"] == pytest.approx(1.0, abs=1e-6) and identity["psnr_target"] < PSNR_CAP_DB
    assert model["psnr"] < PSNR_CAP_DB  # and the member's edit does change the image

    # the edits are those of the trained system on the same batch, seed and sampling settings
    (batch,) = batches
    run.system.eval()
    with torch.no_grad():
        edited = run.system.edit(
            batch["source"], batch.get("mllm_source"), list(batch["instruction"]),
            image_scale=settings["image_scale"], num_inference_steps=2, text_guidance=settings["text_guidance"],
            image_guidance=settings["image_guidance"], generator=torch.Generator().manual_seed(settings["seed"]),
        )  # fmt: skip
    rows = [row["id"] for row in report["rows"] if row["system"] == "this checkpoint"]
    assert rows == list(batch["record_id"])
    for index, record in enumerate(rows):
        written = np.asarray(Image.open(out / "edits" / f"{record}.png"))
        assert np.array_equal(written, np.asarray(to_pil(edited[index]))), record
