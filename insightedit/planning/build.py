"""The system a plan measures, built without Lightning: the member's editor in the configured stage.

``insightedit plan`` reads parameters, activations and FLOPs of the same modules that
:class:`~insightedit.systems.editor_system.EditorSystem` trains, under the same names (``editor.…``), but
importing the system would import Lightning (and with it torchmetrics, torchvision and scipy): seconds of
a command that should answer at once. :class:`PlannedSystem` holds the editor the registry builds and
applies the stage the way the system does (``tests/test_plan_flops.py`` checks the two agree), and
:func:`system_arguments` names the arguments the system accepts, so a misspelt key is still one clear line.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from insightedit.errors import UserError

# EditorSystem.__init__'s arguments (a test compares them with the signature)
SYSTEM_ARGUMENTS = (
    "member", "preset", "stage", "stage_settings", "comprehension", "bridging", "generation", "head",
    "section_overrides", "align_target", "init_from", "weight_decay", "warmup_steps", "evaluation", "sharding",
    "prediction",
)  # fmt: skip
SECTIONS = ("comprehension", "bridging", "generation", "head")


class PlannedSystem(nn.Module):
    """A member's editor (``self.editor``) with the stage applied, as ``EditorSystem`` holds it."""

    def __init__(self, member: str, preset: str, stage: int, init_args: dict[str, Any]) -> None:
        super().__init__()
        from insightedit.models.stages import resolve_stage
        from insightedit.models.zoo import build_editor, get_member

        editor_class = get_member(member).editor_class()
        self.hparams = {"member": member, "preset": preset, "stage": stage}
        self.stage = resolve_stage(
            stage,
            init_args.get("stage_settings"),
            editor_class.stages,
            member,
            editor_class.groups,
            editor_class.losses,
            editor_class.optimizer_groups,
        )
        sections = {name: init_args.get(name) for name in SECTIONS}
        self.editor = build_editor(member, preset, sections, align_target=init_args.get("align_target"))
        self.requires_grad_(False)  # as EditorSystem.apply_stage: freeze all, unfreeze the stage's groups
        groups = self.editor.parameter_groups()
        for group in self.stage.train:
            for parameter in groups.get(group, []):
                parameter.requires_grad_(True)
        self.editor.apply_stage(self.stage)


def planned_system(init_args: dict[str, Any]) -> PlannedSystem:
    """Build :class:`PlannedSystem` from ``model.init_args`` (weights already taken out), or one clear error."""
    unknown = sorted(set(init_args) - set(SYSTEM_ARGUMENTS))
    if unknown:
        raise UserError(
            f"model.init_args has no {', '.join(unknown)}; EditorSystem takes {', '.join(SYSTEM_ARGUMENTS)}"
        )
    return PlannedSystem(
        str(init_args.get("member", "insightedit")),
        str(init_args.get("preset", "tiny")),
        int(init_args.get("stage", 3)),
        init_args,
    )


__all__ = ["SYSTEM_ARGUMENTS", "PlannedSystem", "planned_system"]
