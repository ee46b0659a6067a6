"""Training stages: what each one trains, which losses it weighs, and its learning rates.

Each member of the zoo declares its stages' defaults (:attr:`insightedit.models.editor.Editor.stages`):
which of its parameter groups train, the weight of each of its losses, whether the UNet (and, for members
with one, the BIM) runs, and one learning rate per optimizer group. InsightEdit's are ours, after
SmartEdit (docs/deviations.md#three-stages): 1 *align* trains the [MM] rows, LoRA, Q-Former and IAA Mapper with
``L_LLM + L_align + L_IAA`` and runs no UNet; 2 *edit* adds the UNet and ``L_diff`` (BIM off, no
alignment loss); 3 *full* adds the BIM and uses every loss. A yaml ``stage_settings:`` section overrides
any field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageSettings:
    """One stage: the parts that train, the losses' weights, per-group learning rates."""

    name: str
    train: tuple[str, ...]
    loss_weights: dict[str, float]
    use_unet: bool = True
    use_bim: bool = True
    learning_rates: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train = tuple(self.train)
        if not self.use_unet and ("unet" in self.train or self.loss_weights.get("diff", 0)):
            raise ValueError(f"stage {self.name!r}: trains the UNet or weighs L_diff but use_unet is false")
        if not self.use_bim and "bim" in self.train:
            raise ValueError(f"stage {self.name!r}: trains the BIM but use_bim is false")

    def check(self, member: str, groups: tuple[str, ...], losses: tuple[str, ...], optimizer_groups: Mapping) -> None:
        """Raise ``ValueError`` if the stage names a group, loss or learning-rate group ``member`` lacks."""
        unknown = set(self.train) - set(groups)
        if unknown:
            raise ValueError(
                f"{member} stage {self.name!r}: unknown trainable groups {sorted(unknown)}; choose from {groups}"
            )
        bad = set(self.loss_weights) - set(losses)
        if bad:
            raise ValueError(f"{member} stage {self.name!r}: unknown losses {sorted(bad)}; choose from {losses}")
        bad = set(self.learning_rates) - set(optimizer_groups)
        if bad:
            raise ValueError(
                f"{member} stage {self.name!r}: unknown learning-rate groups {sorted(bad)}; "
                f"choose from {tuple(optimizer_groups)}"
            )

    def weight(self, loss: str) -> float:
        """The weight of ``loss`` in this stage (0 when absent)."""
        return float(self.loss_weights.get(loss, 0.0))

    def as_dict(self) -> dict[str, Any]:
        """Plain data for logs and checkpoints."""
        return asdict(self)


def resolve_stage(
    stage: int,
    overrides: dict[str, Any] | None,
    defaults: Mapping[int, dict[str, Any]],
    member: str = "insightedit",
    groups: tuple[str, ...] = (),
    losses: tuple[str, ...] = (),
    optimizer_groups: Mapping[str, tuple[str, ...]] | None = None,
) -> StageSettings:
    """Stage ``stage`` of a member (its ``defaults``) with ``overrides`` (``stage_settings:``) applied."""
    if stage not in defaults:
        raise ValueError(f"{member} has stages {sorted(defaults)}, not {stage}")
    settings = StageSettings(**defaults[stage]).as_dict()
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise ValueError(f"unknown stage setting {key!r}; known: {sorted(settings)}")
        if key == "learning_rates":
            value = {**settings[key], **(value or {})}
        settings[key] = value
    resolved = StageSettings(**settings)
    resolved.check(member, groups, losses, optimizer_groups or {})
    return resolved


__all__ = ["StageSettings", "resolve_stage"]
