"""The tiny MLLM foundation as a LightningModule: LLaVA-1.5's two phases in one ``insightedit fit`` run.

Steps ``0 .. align_steps-1`` are phase ``align`` (only the projector trains, on captions); the rest are
phase ``instruct`` (projector and whole language model train, on questions). The vision tower is the
CLIP foundation's and stays frozen. Validation generates answers to the held-out questions greedily and
logs ``val/answer_accuracy`` (exact match after normalising case and spaces) and ``val/accuracy_<kind>``.
At the end of fit the run prints one line with the held-out accuracy and writes
``<default_root_dir>/export/`` (see :func:`insightedit.models.foundations.mllm.write_export`). The math
lives in :mod:`insightedit.models.foundations.mllm`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from insightedit.models.foundations.mllm import (
    AnswerTally,
    ConversationEncoder,
    answer_loss,
    build_foundation_llava,
    generate_answers,
    set_phase,
    write_export,
)
from insightedit.training.optimizer import adamw

EXPORT_DIR = "export"


class MllmFoundation(L.LightningModule):
    """The tiny LLaVA pretrained as LLaVA was: projector alignment on captions, then instruction tuning.

    Args:
        vision_tower: the CLIP foundation's export folder (its vision tower, frozen); ``None``: the twin's
            seeded random tower.
        align_steps: steps of phase ``align`` before phase ``instruct``.
        learning_rate: AdamW learning rate of the projector.
        llm_learning_rate: AdamW learning rate of the language model (phase ``instruct``).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up at the start of each phase, then cosine decay to the phase's end.
        max_new_tokens: longest generated answer in validation.
        export: write ``<default_root_dir>/export/`` at the end of fit.
        vision_feature_layer: the vision tower's hidden state the projector reads (default the preset's -2).
        train_vision_tower: train the vision tower in phase ``instruct`` too (LLaVA-1.5 freezes it).
        vision_learning_rate: its learning rate (default ``llm_learning_rate``).
    """

    def __init__(
        self,
        vision_tower: str | None = None,
        align_steps: int = 100,
        learning_rate: float = 1e-3,
        llm_learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        max_new_tokens: int = 16,
        export: bool = True,
        vision_feature_layer: int | None = None,
        train_vision_tower: bool = False,
        vision_learning_rate: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.llava, self.tokenizer = build_foundation_llava(vision_tower, vision_feature_layer)
        self.encoder = ConversationEncoder(self.tokenizer, self.llava)
        self._phase = ""
        self.set_phase("align" if align_steps > 0 else "instruct")
        self.tally = AnswerTally()
        self.metric: dict[str, float] = {}
        self.metric_step = -1

    @property
    def phase(self) -> str:
        """``align`` for the first ``align_steps`` steps, then ``instruct``."""
        return "align" if self.global_step < int(self.hparams["align_steps"]) else "instruct"

    def set_phase(self, phase: str) -> None:
        """Make ``phase``'s parameters (and only those) trainable."""
        if phase != self._phase:
            set_phase(self.llava, phase, bool(self.hparams["train_vision_tower"]))
            self._phase = phase

    def trainable_names(self) -> list[str]:
        """Names of the parameters that train now."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One step of the current phase: captions in ``align``, questions in ``instruct``."""
        phase = self.phase
        self.set_phase(phase)
        texts = ("caption_question", "caption") if phase == "align" else ("question", "answer")
        turns = self.encoder(list(batch[texts[0]]), list(batch[texts[1]])).to(self.device)
        loss = answer_loss(self.llava, batch["pixels"], turns)
        size = batch["pixels"].shape[0]
        self.log(f"train/loss_{phase}", loss, prog_bar=True, batch_size=size)
        return loss

    def on_validation_epoch_start(self) -> None:
        """Start counting answers afresh."""
        self.tally = AnswerTally()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Answer the held-out questions greedily and count exact matches; log the answer NLL."""
        questions, answers = list(batch["question"]), list(batch["answer"])
        turns = self.encoder(questions, answers).to(self.device)
        self.log("val/loss", answer_loss(self.llava, batch["pixels"], turns), batch_size=len(questions))
        predicted = generate_answers(self.llava, self.encoder, batch["pixels"], questions,
                                     int(self.hparams["max_new_tokens"]))  # fmt: skip
        self.tally.add(predicted, answers, list(batch["kind"]))

    def on_validation_epoch_end(self) -> None:
        """Log ``val/answer_accuracy`` and ``val/accuracy_<kind>``; remember them for the end of fit."""
        if not self.tally.total:
            return
        self.metric = {"answer_accuracy": self.tally.accuracy(), **self.tally.per_kind()}
        self.metric_step = self.global_step
        self.log("val/answer_accuracy", self.metric["answer_accuracy"], prog_bar=True)
        for kind, value in self.tally.per_kind().items():
            self.log(f"val/accuracy_{kind}", value)

    @torch.no_grad()
    def evaluate(self, loader: Any) -> dict[str, float]:
        """Held-out accuracy over ``loader`` (overall as ``answer_accuracy``, and per kind), in eval mode."""
        training = self.training
        self.eval()
        tally = AnswerTally()
        try:
            for batch in loader:
                pixels = batch["pixels"].to(self.device)
                predicted = generate_answers(self.llava, self.encoder, pixels, list(batch["question"]),
                                             int(self.hparams["max_new_tokens"]))  # fmt: skip
                tally.add(predicted, list(batch["answer"]), list(batch["kind"]))
        finally:
            self.train(training)
        return {"answer_accuracy": tally.accuracy(), **tally.per_kind()}

    def on_fit_end(self) -> None:
        """Measure the final model (unless the last validation did), print one line, write the export."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if self.metric_step != self.global_step and datamodule is not None:
            self.metric = self.evaluate(datamodule.val_dataloader())
            self.metric_step = self.global_step
            for logger in trainer.loggers:
                logger.log_metrics({f"val/{k}" if k == "answer_accuracy" else f"val/accuracy_{k}": v
                                    for k, v in self.metric.items()}, step=self.global_step)  # fmt: skip
        if not trainer.is_global_zero:
            return
        accuracy = self.metric.get("answer_accuracy", math.nan)
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in self.metric.items() if k != "answer_accuracy")
        where = ""
        if self.hparams["export"]:
            out = write_export(
                self.llava, self.tokenizer, Path(trainer.default_root_dir) / EXPORT_DIR,
                metric={"answer_accuracy": accuracy}, steps=self.global_step,
                extra={"per_kind": {k: v for k, v in self.metric.items() if k != "answer_accuracy"},
                       "vision_tower": self.hparams["vision_tower"], "align_steps": self.hparams["align_steps"]},
            )  # fmt: skip
            where = f"; export: {out}"
        print(f"mllm foundation: held-out answer accuracy {accuracy:.3f} ({kinds}) "
              f"after {self.global_step} steps{where}", flush=True)  # fmt: skip

    def configure_optimizers(self) -> Any:
        """AdamW: the projector and the language model (with the head) as two groups, each scheduled by phase.

        The projector warms up at step 0 and decays over the whole run; the language model warms up at
        ``align_steps`` and decays to the end (it has no gradient before, so AdamW leaves it untouched).
        """
        hp = self.hparams
        llava = self.llava
        llm = [*llava.model.language_model.parameters(), *llava.lm_head.parameters()]
        groups = [
            {"params": list(llava.model.multi_modal_projector.parameters()), "lr": hp["learning_rate"],
             "name": "projector"},
            {"params": llm, "lr": hp["llm_learning_rate"], "name": "language_model"},
        ]  # fmt: skip
        if hp["train_vision_tower"]:  # scheduled as the language model: it trains from align_steps
            groups.append({"params": list(llava.model.vision_tower.parameters()), "name": "vision_tower",
                           "lr": hp["vision_learning_rate"] or hp["llm_learning_rate"]})  # fmt: skip
        optimizer = adamw(groups, weight_decay=hp["weight_decay"])
        total = int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 else 10_000
        align = int(hp["align_steps"])
        warmup = int(hp["warmup_steps"])

        def schedule(start: int, end: int) -> Any:
            def factor(step: int) -> float:
                if step < start:
                    return 0.0
                done = step - start
                if done < warmup:
                    return (done + 1) / warmup
                span = max(end - start - warmup, 1)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (done - warmup) / span)))

            return factor

        factors = [schedule(0, total), schedule(align, total)] + [schedule(align, total)] * (len(groups) - 2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
