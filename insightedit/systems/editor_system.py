"""The system that trains any member of the zoo, stage by stage, with no member-specific code.

One LightningModule holds an :class:`~insightedit.models.editor.Editor` as ``editor`` (built from the
registry, :mod:`insightedit.models.zoo`). The stage (:mod:`insightedit.models.stages`, the member's
defaults and a yaml's ``stage_settings``) decides which of the member's parameter groups train, which of
its losses count and with which weights. Checkpoints keep only what trains (never a frozen 7B base) plus
the hyperparameters, and the next stage starts from them with ``init_from``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from insightedit.errors import UserError
from insightedit.models.editor import Editor
from insightedit.models.stages import StageSettings, resolve_stage
from insightedit.models.zoo import apply_section_overrides, build_editor, get_member
from insightedit.systems.generation import log_skipped_samples
from insightedit.systems.load_reports import loads_on_console
from insightedit.systems.prediction import PredictionRun, PredictSettings, done_ids, merge_journals, summary_line
from insightedit.training.optimizer import adamw
from insightedit.training.safe_load import check_distributed_checkpoint, load_checkpoint
from insightedit.training.sharded_loading import load_into_shards, loading_is_deferred
from insightedit.training.sharding import ShardingSettings, load_distributed_checkpoint, shard_system


class EditorSystem(L.LightningModule):
    """Train, validate and test one member of the zoo (``insightedit zoo`` lists them).

    Args:
        member: the editor (``instruct_pix2pix``, ``mgie``, ``smartedit``, ``insightedit``,
            ``insightedit_no_iaa``, ``insightedit_no_bim``).
        preset: ``"tiny"`` (CPU twins of everything) or ``"full"`` (LLaVA-1.5-7B, InstructPix2Pix,
            CLIP ViT-L/14; built on ``meta`` unless the sections name weights, which are read right after
            the editor is built: :meth:`Editor.load_pretrained`).
        stage: 1, 2 or 3: the member's stage (its defaults: ``insightedit zoo --member <name>``).
        stage_settings: overrides of the stage's defaults (``train``, ``loss_weights``, ``use_unet``,
            ``use_bim``, ``learning_rates``).
        comprehension, bridging, generation, head: the keyword arguments of each part the member has
            (weights, sizes, LoRA, quantization...); the widths that connect them are filled in.
        section_overrides: settings for whichever of the parts above the member has, e.g.
            ``{"comprehension": {"pretrained": DIR}, "bridging": {...}}``: deep-merged over the member's own
            sections (they win over the sections, command line included), skipped for parts it lacks
            (:func:`~insightedit.models.zoo.apply_section_overrides`). For overlays that serve every member
            (``lightning_configs/full_width_cpu.yaml``); a section a member lacks, given directly, is an error.
            The hyperparameters keep the merged sections (what was built) and no ``section_overrides``.
        align_target: for members with ``L_align``: the text whose frozen text-encoder encoding ``q``
            is aligned to (``plain_instruction``, ``instruction`` or ``target_caption``; ``None``: the
            member's default).
        init_from: a checkpoint of the previous stage to start from.
        weight_decay: AdamW weight decay for every group.
        warmup_steps: linear warmup, then cosine decay to 10% over the run.
        evaluation: settings of ``insightedit test`` (:class:`insightedit.evaluation.model_test.TestSettings`).
        sharding: FSDP2 settings used under ``ModelParallelStrategy`` / ``FSDP2Strategy``
            (:class:`insightedit.training.sharding.ShardingSettings`); ignored by other strategies. Under
            FSDP2 the CLI builds the system with its loading step (``pretrained``, ``init_from``) deferred
            to ``configure_model``, after sharding, on rank 0 only (``loading_pending``; see
            :mod:`insightedit.training.sharded_loading`); :meth:`finish_loading` runs it outside Lightning.
        prediction: settings of ``insightedit predict``: output folder and sampling
            (:class:`insightedit.systems.prediction.PredictSettings`).
    """

    def __init__(
        self,
        member: str = "insightedit",
        preset: str = "tiny",
        stage: int = 3,
        stage_settings: dict[str, Any] | None = None,
        comprehension: dict[str, Any] | None = None,
        bridging: dict[str, Any] | None = None,
        generation: dict[str, Any] | None = None,
        head: dict[str, Any] | None = None,
        section_overrides: dict[str, Any] | None = None,
        align_target: str | None = None,
        init_from: str | None = None,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        evaluation: dict[str, Any] | None = None,
        sharding: dict[str, Any] | None = None,
        prediction: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        given = {"comprehension": comprehension, "bridging": bridging, "generation": generation, "head": head}
        merged = apply_section_overrides(member, given, section_overrides)
        comprehension, bridging = merged["comprehension"], merged["bridging"]
        generation, head = merged["generation"], merged["head"]
        # test and predict settings stay out of checkpoints: Lightning's CLI lets a --ckpt_path's hyperparameters
        # override the command line, so a stored section would hide --model.init_args.evaluation / .prediction
        # (checkpoints written before evaluation was left out still hold it: InsightEditCLI keeps the command line's)
        self.save_hyperparameters(ignore=["evaluation", "prediction"])
        if section_overrides:  # what is saved is what was built (LightningCLI hands save_hyperparameters the config)
            self.hparams.update(merged)
            self.hparams["section_overrides"] = None
        self.evaluation: dict[str, Any] = dict(evaluation or {})
        editor_class = get_member(member).editor_class()
        self.stage: StageSettings = resolve_stage(
            stage,
            stage_settings,
            editor_class.stages,
            member,
            editor_class.groups,
            editor_class.losses,
            editor_class.optimizer_groups,
        )
        self.sharding = ShardingSettings.from_config(sharding)
        self.prediction = PredictSettings.from_config(prediction)
        self._predict_run: PredictionRun | None = None
        sections = {"comprehension": comprehension, "bridging": bridging, "generation": generation, "head": head}
        self.editor: Editor = build_editor(member, preset, sections, align_target=align_target)  # reads no weights
        self.strict_loading = False  # checkpoints hold only trained weights; on_load_checkpoint checks them
        self._carried: set[str] = set()
        self._init_from = init_from
        # under FSDP2 (the CLI's deferred_pretrained_loading) the loading step waits for configure_model,
        # where rank 0 alone runs it and the weights go straight into the shards (sharded_loading.py)
        self.loading_pending = loading_is_deferred() and self.sharding.load_after_sharding
        self._built_with = (torch.get_rng_state(), torch.get_default_dtype())  # what the loading step starts from
        self.apply_stage()
        if not self.loading_pending:
            self._load_step()

    def _load_step(self) -> None:
        """Read what the sections name (``pretrained``), freeze for the stage, then load ``init_from``."""
        with loads_on_console():  # "generation.pretrained: loaded N tensors from ..."
            self.editor.load_pretrained()
        self.apply_stage()
        if self._init_from:
            self.load_trained_weights(self._init_from, report=True)

    def finish_loading(self) -> None:
        """Run the loading step a system built under ``deferred_pretrained_loading`` left for later (else nothing).

        It starts from the random state and default dtype the constructor left, so the model is the one a
        system built without deferral has. Lightning calls it (through ``configure_model``) for you.
        """
        if not self.loading_pending:
            return
        rng_state, dtype = self._built_with
        previous = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(rng_state)
            torch.set_default_dtype(dtype)
            try:
                self._load_step()
            finally:
                torch.set_default_dtype(previous)
        self.loading_pending = False

    # --------------------------------------------------------------------------------------- stages
    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every trainable-in-some-stage parameter by group, then by its name in this system."""
        names = {id(p): n for n, p in self.named_parameters(remove_duplicate=False)}
        members = self.editor.parameter_groups()
        return {group: {names[id(p)]: p for p in members.get(group, [])} for group in self.editor.groups}

    def apply_stage(self) -> None:
        """Freeze everything, then unfreeze the stage's groups; let the editor switch stage-dependent parts."""
        self.requires_grad_(False)
        groups = self.parameter_groups()
        for group in self.stage.train:
            for parameter in groups[group].values():
                parameter.requires_grad_(True)
        self.editor.apply_stage(self.stage)

    def trainable_names(self) -> set[str]:
        """Names of the parameters this stage trains."""
        return {name for name, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard blocks, units and the root over the data-parallel mesh.

        Other strategies leave the model alone. Called by Lightning before the optimizer is built, possibly
        more than once (fit, then test); sharding an already sharded system does nothing.
        See :func:`insightedit.training.sharding.shard_system`. A system built with its loading step
        deferred (the CLI does so under ``ModelParallelStrategy``) loads here: after sharding, read by rank 0
        only (:func:`insightedit.training.sharded_loading.load_into_shards`); under other strategies, as usual.
        """
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            self.finish_loading()
            return
        mesh = self.device_mesh
        if mesh is None:
            raise RuntimeError("ModelParallelStrategy set up no device mesh before configure_model")
        if mesh["tensor_parallel"].size() != 1:
            raise UserError("the zoo's systems have no tensor-parallel plan: set tensor_parallel_size: 1")

        def shard() -> None:
            shard_system(self, mesh["data_parallel"], self.sharding, str(self.trainer.precision))

        if self.loading_pending:  # rank 0 loads, the others take its skeleton; the weights land in the shards
            load_into_shards(self, self.finish_loading, shard, state=("_carried",))
            self.loading_pending = False
        else:
            shard()

    # --------------------------------------------------------------------------------------- losses
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Every loss the stage weighs (the member's, e.g. ``llm``, ``iaa``, ``align``, ``diff``) and ``loss``."""
        return self.editor.compute_losses(batch, self.stage)

    def _log_losses(self, prefix: str, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, value in losses.items():
            key = f"{prefix}/loss" if name == "loss" else f"{prefix}/loss_{name}"
            self.log(key, value, prog_bar=name in ("loss", "diff"), batch_size=batch_size, sync_dist=prefix != "train")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The stage's weighted loss; each loss logged on its own as ``train/loss_<name>``, and skipped samples."""
        losses = self.compute_losses(batch)
        self._log_losses("train", losses, batch["source"].shape[0])
        log_skipped_samples(self, batch)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The same losses on held-out pairs (CFG dropout off)."""
        self._log_losses("val", self.compute_losses(batch), batch["source"].shape[0])

    def on_train_start(self) -> None:
        """Warn if a module with trainable parameters is in eval mode (the frozen towers are, by design).

        Lightning's own check counts every module in eval mode, the frozen VAE, text encoder and CLIP
        tower included; :mod:`insightedit.console` silences it in favour of this one.
        """
        stuck = [
            name or "(the system)"
            for name, module in self.named_modules()
            if not module.training and any(p.requires_grad for p in module.parameters(recurse=False))
        ]
        if stuck:
            shown = ", ".join(stuck[:5]) + (f" and {len(stuck) - 5} more" if len(stuck) > 5 else "")
            rank_zero_warn(f"{len(stuck)} module(s) with trainable parameters are in eval mode: {shown}")

    # ------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        """AdamW with one parameter group per optimizer group (lora, bridge, unet), each its own lr."""
        groups = self.parameter_groups()
        param_groups = []
        for optimizer_group, members in self.editor.optimizer_groups.items():
            params = [p for g in members for p in groups[g].values() if p.requires_grad]
            if params:
                if optimizer_group not in self.stage.learning_rates:
                    raise UserError(f"stage {self.stage.name!r} sets no learning rate for {optimizer_group!r}")
                lr = float(self.stage.learning_rates[optimizer_group])
                param_groups.append({"params": params, "lr": lr, "name": optimizer_group})
        if not param_groups:
            raise UserError(f"stage {self.stage.name!r} trains nothing: check stage_settings.train")
        optimizer = adamw(param_groups, weight_decay=self.hparams["weight_decay"])
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        warmup = int(self.hparams["warmup_steps"])

        def scale(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------- checkpoints
    def saved_names(self) -> set[str]:
        """What a checkpoint keeps: trained weights, those carried from earlier stages, the bridge's buffers.

        The buffers matter: the BIM's random Fourier matrix is drawn when the system is built.
        """
        drawn = {f"editor.{name}" for name in self.editor.persistent_buffers()}
        return self.trainable_names() | self._carried | (drawn & set(self.state_dict()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen weights (the LLM base, vision tower, VAE, CLIP, text encoder) from the checkpoint."""
        keep = self.saved_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["insightedit"] = {
            "member": self.hparams["member"],
            "stage": self.stage.as_dict(),
            "saved": sorted(keep),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming: every weight this stage trains must be in the checkpoint.

        Under ``ModelParallelStrategy`` the strategy has already loaded (and removed) ``state_dict``;
        the names it held are then read from ``checkpoint["insightedit"]["saved"]``.
        """
        if "state_dict" in checkpoint:
            stored = set(checkpoint["state_dict"])
        else:
            stored = set(checkpoint.get("insightedit", {}).get("saved", self.trainable_names()))
        missing = sorted(self.trainable_names() - stored)
        if missing:
            raise UserError(f"checkpoint lacks {len(missing)} trained weights, e.g. {missing[:3]}")

    def load_trained_weights(self, path: str | Path, report: bool = False) -> list[str]:
        """Start from a previous stage's checkpoint: load its weights, check every key; return the keys.

        ``path`` is a checkpoint file, or the folder an ``FSDP2Strategy`` with
        ``save_distributed_checkpoint: true`` writes (read whole, in this process). With ``report``, one
        console line (rank 0) says how many tensors came from where, and which weights this stage trains
        that the file lacks (they start from ``pretrained`` or from scratch).
        """
        path = Path(path)
        if not path.is_file() and not (path / ".metadata").is_file():
            raise UserError(f"init_from: checkpoint {path} not found")
        if path.is_dir():  # torch unpickles a folder's index unrestricted: refuse one that names code first
            check_distributed_checkpoint(path, "init_from")
            try:
                checkpoint = load_distributed_checkpoint(path)
            except Exception as error:  # noqa: BLE001 - a corrupt folder is a user error, said in one line
                reason = (str(error).splitlines() or [type(error).__name__])[0]
                raise UserError(f"init_from: {path} is not a readable distributed checkpoint ({reason})") from error
        else:
            checkpoint = load_checkpoint(path, "init_from")  # weights only: never runs code from the file
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"init_from: {path} is not a readable Lightning checkpoint (no state_dict)")
        own = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            origin = (checkpoint.get("insightedit") or {}).get("member", "insightedit")
            this = self.hparams["member"]
            mismatch = f" (it is a {origin} checkpoint, this is {this})" if origin != this else ""
            raise UserError(f"init_from: {path} has weights this system lacks{mismatch}, e.g. {unexpected[:3]}")
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise UserError(f"init_from: {name} has shape {tuple(value.shape)}, expected {tuple(own[name].shape)}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        self._carried |= set(state)
        if report:
            rank_zero_info(f"init_from: loaded {len(state)} tensors from {path}{self._not_in(state)}")
        return sorted(state)

    def _not_in(self, state: dict[str, Any]) -> str:
        """``"; N weights this stage trains are not in it ...: group (n), ..."``, or ``""`` if it has them all."""
        groups = self.parameter_groups()
        absent = {group: sum(name not in state for name in names) for group, names in groups.items()
                  if group in self.stage.train}
        absent = {group: count for group, count in absent.items() if count}
        if not absent:
            return ""
        listed = ", ".join(f"{group} ({count})" for group, count in absent.items())
        count = sum(absent.values())
        return f"; {count} weights this stage trains are not in it (they keep their pretrained or new values): {listed}"

    # ------------------------------------------------------------------------------------------ test
    def on_test_start(self) -> None:
        """Load the metric backends once (a missing weight file is a one-line user error)."""
        from insightedit.evaluation.model_test import EditTestRun, TestSettings

        if not self.stage.use_unet:
            raise UserError(f"stage {self.stage.name!r} has no UNet and cannot edit: test a stage 2 or 3 model")
        self._test_run = EditTestRun(TestSettings(**self.evaluation))
        if self._test_run.settings.save_edits:
            self._test_run.edits_dir = self._test_output_dir() / "edits"

    def _test_output_dir(self) -> Path:
        """Where ``insightedit test`` writes: ``evaluation.out_dir``, else the run's log dir."""
        configured = self._test_run.settings.out_dir
        return Path(configured or self.trainer.log_dir or self.trainer.default_root_dir)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Edit the batch with this model and score it beside the identity edit (``edited = source``)."""
        settings = self._test_run.settings
        generator = torch.Generator(device=batch["source"].device).manual_seed(settings.seed + batch_idx)
        edited = self.edit(
            batch["source"],
            batch.get("mllm_source"),
            list(batch["instruction"]),
            image_scale=settings.image_scale,
            num_inference_steps=settings.num_inference_steps,
            text_guidance=settings.text_guidance,
            image_guidance=settings.image_guidance,
            generator=generator,
        )
        self._test_run.add("this checkpoint", batch, edited)
        self._test_run.add("identity edit", batch, batch["source"])

    def on_test_epoch_end(self) -> None:
        """Gather every rank's rows; rank 0 prints the table, writes JSON and CSV, logs the means."""
        run = self._test_run
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, run.rows)
            run.rows = {}
            run.merge(gathered)
        checkpoint = getattr(self.trainer, "ckpt_path", None)
        report = run.report(str(checkpoint) if checkpoint else None)
        pooled = {system: groups.get("all", {}) for system, groups in report["systems"].items()}  # type: ignore[union-attr]
        for system, summary in pooled.items():
            for key, value in summary.items():
                if isinstance(value, float) and key[-2:] != "_n":
                    name = "model" if system == "this checkpoint" else "identity"
                    self.log(f"test/{name}/{key}", value, rank_zero_only=True, sync_dist=False)
        out_dir = self._test_output_dir()  # on every rank: trainer.log_dir is a broadcast
        if self.trainer.is_global_zero:
            json_path, csv_path = run.write(report, out_dir)
            print(run.table(report))
            print(run.outputs(json_path, csv_path, list(self.loggers)))

    # --------------------------------------------------------------------------------------- predict
    def setup(self, stage: str) -> None:
        """``predict``: list the edits already in the output folder and leave them out of the data.

        Rank 0 lists ``<out>/*.png`` and every rank receives that list, so all ranks shard the same
        remaining records (Lightning's predict sampler splits them without repeating any).
        """
        if stage != "predict":
            return
        if not self.stage.use_unet:
            raise UserError(f"stage {self.stage.name!r} has no UNet and cannot edit: predict with a stage 2 or 3 model")
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy | ModelParallelStrategy) and self.trainer.world_size > 1:
            # sharded weights are gathered collectively per forward; ranks edit unequal numbers of batches
            raise UserError("predict runs data-parallel: use --trainer.strategy=ddp (every rank holds the whole model)")
        out_dir = Path(self.prediction.out_dir or Path(self.trainer.default_root_dir) / "predictions")
        run = PredictionRun(self.prediction, out_dir, self.global_rank)
        done = self.trainer.strategy.broadcast(done_ids(out_dir) if self.trainer.is_global_zero else None)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "skip_predictions"):
            run.skipped = datamodule.skip_predictions(done)
        else:  # a data module that cannot filter: its batches still hold them, the run passes them over
            run.skip = done
        self._predict_run = run

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Edit the batch and write each edit as ``<out>/<id>.png`` (see :mod:`insightedit.systems.prediction`)."""
        if self._predict_run is None:
            raise RuntimeError("predict_step ran before setup('predict')")
        self._predict_run.edit_batch(self.editor, batch)

    def on_predict_end(self) -> None:
        """Gather every rank's counts; rank 0 merges the journals into ``predictions.jsonl`` and says what was done."""
        run = self._predict_run
        if run is None:
            return
        shares: list[Any] = [(run.written, run.failed)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shares = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shares, (run.written, run.failed))
        if self.trainer.is_global_zero:
            written = [share[0] for share in shares]
            failed = {key: value for share in shares for key, value in share[1].items()}
            listed = merge_journals(run.out_dir)
            print(summary_line(run.out_dir, written, run.skipped, failed, listed))
        self._predict_run = None

    # ------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def edit(
        self,
        source: torch.Tensor,
        mllm_source: torch.Tensor | None,
        instructions: list[str],
        image_scale: float | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Edit ``source`` (B, 3, H, W) in [-1, 1] with the member (:meth:`Editor.edit`)."""
        return self.editor.edit(source, mllm_source, instructions, image_scale=image_scale, **sampling)


InsightEditSystem = EditorSystem  # the name configs and checkpoints written before the zoo use

__all__ = ["EditorSystem", "InsightEditSystem"]
