"""The three training stages: what each one trains, which losses it weighs, and how it starts.

Defaults follow DESIGN.md §2 (our split, after SmartEdit): 1 *align* trains the [MM] rows, LoRA,
Q-Former and IAA Mapper with ``L_LLM + L_align + L_IAA`` and runs no UNet; 2 *edit* adds the UNet with
its decoupled cross-attention and ``L_diff`` (BIM off, no alignment loss); 3 *full* adds the BIM and
uses every loss. A yaml ``stage:`` section may override any field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

LOSSES = ("llm", "iaa", "align", "diff")
GROUPS = ("mm_embeddings", "lora", "qformer", "mapper", "bim", "unet")
OPTIMIZER_GROUPS = {"lora": ("mm_embeddings", "lora"), "bridge": ("qformer", "mapper", "bim"), "unet": ("unet",)}


@dataclass
class StageSettings:
    """One stage: the parts that train, the losses' weights, per-group learning rates."""

    name: str
    train: tuple[str, ...]
    loss_weights: dict[str, float]
    use_unet: bool = True
    use_bim: bool = True
    learning_rates: dict[str, float] = field(default_factory=lambda: {"lora": 2e-4, "bridge": 1e-4, "unet": 1e-5})

    def __post_init__(self) -> None:
        self.train = tuple(self.train)
        unknown = set(self.train) - set(GROUPS)
        if unknown:
            raise ValueError(f"stage {self.name!r}: unknown trainable groups {sorted(unknown)}; choose from {GROUPS}")
        bad = set(self.loss_weights) - set(LOSSES)
        if bad:
            raise ValueError(f"stage {self.name!r}: unknown losses {sorted(bad)}; choose from {LOSSES}")
        bad = set(self.learning_rates) - set(OPTIMIZER_GROUPS)
        if bad:
            raise ValueError(f"stage {self.name!r}: unknown learning-rate groups {sorted(bad)}")
        if not self.use_unet and ("unet" in self.train or self.loss_weights.get("diff", 0)):
            raise ValueError(f"stage {self.name!r}: trains the UNet or weighs L_diff but use_unet is false")
        if not self.use_bim and "bim" in self.train:
            raise ValueError(f"stage {self.name!r}: trains the BIM but use_bim is false")

    def weight(self, loss: str) -> float:
        """The weight of ``loss`` in this stage (0 when absent)."""
        return float(self.loss_weights.get(loss, 0.0))

    def as_dict(self) -> dict[str, Any]:
        """Plain data for logs and checkpoints."""
        return asdict(self)


def default_stage(stage: int) -> StageSettings:
    """The default settings of stage 1, 2 or 3."""
    if stage == 1:
        return StageSettings(
            name="align",
            train=("mm_embeddings", "lora", "qformer", "mapper"),
            loss_weights={"llm": 1.0, "align": 1.0, "iaa": 1.0},
            use_unet=False,
            use_bim=False,
        )
    if stage == 2:
        return StageSettings(
            name="edit",
            train=("mm_embeddings", "lora", "qformer", "mapper", "unet"),
            loss_weights={"llm": 1.0, "iaa": 1.0, "diff": 1.0},
            use_bim=False,
        )
    if stage == 3:
        return StageSettings(
            name="full",
            train=GROUPS,
            loss_weights={"llm": 1.0, "iaa": 1.0, "align": 1.0, "diff": 1.0},
        )
    raise ValueError(f"stage must be 1, 2 or 3, got {stage}")


def resolve_stage(stage: int, overrides: dict[str, Any] | None = None) -> StageSettings:
    """Stage ``stage``'s defaults with ``overrides`` (a yaml ``stage_settings:`` section) applied."""
    settings = default_stage(stage).as_dict()
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise ValueError(f"unknown stage setting {key!r}; known: {sorted(settings)}")
        settings[key] = value
    return StageSettings(**settings)
