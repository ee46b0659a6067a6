"""``insightedit zoo``: the members of the zoo, what their UNet reads, their size and their stages.

Every number is counted, not written down: each member is built at full size on the ``meta`` device
(no memory, no download, no weight initialisation) from the registry (:mod:`insightedit.models.zoo`),
and its stages are the member's own defaults (:attr:`insightedit.models.editor.Editor.stages`) resolved
as a training run resolves them. A stage trains the union of its groups
(:meth:`~insightedit.models.editor.Editor.parameter_groups`). Nothing is cached.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from insightedit.commands.parsing import CommandParser
from insightedit.errors import UserError

MILLION = 1e6


@dataclass
class StageSummary:
    """One stage of a member: what trains and which losses count."""

    number: int
    name: str
    train: list[str]
    loss_weights: dict[str, float]
    use_unet: bool
    learning_rates: dict[str, float]
    trainable: int  # parameters this stage trains, at full size


@dataclass
class MemberSummary:
    """One member of the zoo, counted at full size."""

    name: str
    paper: str
    conditions: str
    sections: list[str]
    total: int = 0  # every parameter, frozen ones included
    trainable: int = 0  # what the final stage trains
    groups: dict[str, int] = field(default_factory=dict)  # parameters per trainable group
    losses: list[str] = field(default_factory=list)
    stages: list[StageSummary] = field(default_factory=list)
    unavailable: str | None = None  # why the member could not be built (e.g. its module is missing)


def _unique_count(parameters: Any) -> int:
    seen: dict[int, int] = {}
    for parameter in parameters:
        seen[id(parameter)] = parameter.numel()
    return sum(seen.values())


def summarize(name: str, preset: str = "full") -> MemberSummary:
    """Build member ``name`` of ``preset`` (full: on ``meta``) and count its parameters and stages."""
    import torch
    from transformers.initialization import no_init_weights

    from insightedit.models.stages import resolve_stage
    from insightedit.models.zoo import build_editor, get_member

    entry = get_member(name)
    summary = MemberSummary(entry.name, entry.paper, entry.conditions, list(entry.sections))
    try:
        editor_class = entry.editor_class()
    except ImportError as error:  # a registered member whose module is not there (yet)
        summary.unavailable = f"cannot import {entry.editor}: {error}"
        return summary
    if preset == "full":
        with torch.device("meta"), no_init_weights():  # values are irrelevant to counts; skip the init
            editor = build_editor(name, preset)
    else:
        editor = build_editor(name, preset)
    groups = editor.parameter_groups()
    summary.total = _unique_count(editor.parameters())
    summary.groups = {group: _unique_count(groups.get(group, [])) for group in editor_class.groups}
    summary.losses = list(editor_class.losses)
    for number in sorted(editor_class.stages):
        stage = resolve_stage(
            number,
            None,
            editor_class.stages,
            name,
            editor_class.groups,
            editor_class.losses,
            editor_class.optimizer_groups,
        )
        trained = _unique_count(p for group in stage.train for p in groups.get(group, []))
        summary.stages.append(
            StageSummary(
                number,
                stage.name,
                list(stage.train),
                {loss: weight for loss, weight in stage.loss_weights.items() if weight},
                stage.use_unet,
                dict(stage.learning_rates),
                trained,
            )
        )
    summary.trainable = summary.stages[-1].trainable if summary.stages else 0
    return summary


def _millions(count: int) -> str:
    return f"{count / MILLION:,.1f}M"


def _stage_lines(stages: list[StageSummary]) -> list[str]:
    """One line per stage; consecutive stages with the same recipe share a line (``1-3 edit: ...``)."""
    runs: list[list[StageSummary]] = []
    for stage in stages:
        recipe = (stage.name, stage.train, stage.loss_weights, stage.use_unet)
        last = runs[-1][-1] if runs else None
        if last is not None and (last.name, last.train, last.loss_weights, last.use_unet) == recipe:
            runs[-1].append(stage)
        else:
            runs.append([stage])
    lines = []
    for run in runs:
        first, numbers = run[0], f"{run[0].number}" if len(run) == 1 else f"{run[0].number}-{run[-1].number}"
        losses = " + ".join(f"{w:g}·{loss}" if w != 1 else loss for loss, w in first.loss_weights.items())
        lines.append(f"{numbers} {first.name}: {', '.join(first.train)} ({_millions(first.trainable)}); {losses}")
    return lines


def format_table(summaries: list[MemberSummary], preset: str = "full") -> str:
    """The members as one table, then each member's stages."""
    header = ("member", "paper", "the UNet reads", f"params ({preset})", "trains (final stage)")
    rows = [header]
    for s in summaries:
        if s.unavailable:
            rows.append((s.name, s.paper, s.conditions, "unavailable", ""))
        else:
            rows.append((s.name, s.paper, s.conditions, _millions(s.total), _millions(s.trainable)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [cell.rjust(width) if i >= 3 else cell.ljust(width) for i, (cell, width) in pairs]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", "stages (what each trains, its parameters, its losses):"]
    for s in summaries:
        if s.unavailable:
            lines.append(f"  {s.name}: {s.unavailable}")
            continue
        lines.append(f"  {s.name}")
        lines += [f"    {line}" for line in _stage_lines(s.stages)]
    lines.append("")
    lines.append("details: insightedit zoo --member <name>; configs: lightning_configs/<name>.yaml, tiny/<name>.yaml")
    return "\n".join(lines)


def format_member(summary: MemberSummary, preset: str = "full") -> str:
    """One member's details: its parts, groups and every stage's settings."""
    s = summary
    lines = [f"{s.name}: {s.paper}", f"  the UNet reads: {s.conditions}", f"  config sections: {', '.join(s.sections)}"]
    if s.unavailable:
        return "\n".join([*lines, f"  unavailable: {s.unavailable}"])
    lines.append(f"  parameters ({preset}): {s.total:,} in all; {s.trainable:,} trained in the final stage")
    lines.append("  trainable groups: " + ", ".join(f"{g} {count:,}" for g, count in s.groups.items()))
    lines.append(f"  losses: {', '.join(s.losses)}")
    for stage in s.stages:
        lines.append(f"  stage {stage.number} ({stage.name}): trains {', '.join(stage.train)} = {stage.trainable:,}")
        weights = ", ".join(f"{loss} {w:g}" for loss, w in stage.loss_weights.items())
        rates = ", ".join(f"{group} {lr:g}" for group, lr in stage.learning_rates.items())
        lines.append(f"    losses: {weights}; UNet runs: {'yes' if stage.use_unet else 'no'}; learning rates: {rates}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Entry point of ``insightedit zoo``."""
    parser = CommandParser(prog="insightedit zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--member", default=None, help="one member's details (its stages and groups)")
    parser.add_argument("--preset", choices=("full", "tiny"), default="full", help="sizes to count (default full)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    from insightedit.models.zoo import MEMBERS, get_member

    if args.member is not None:
        get_member(args.member)  # an unknown name is one line listing the members
    names = [args.member] if args.member else list(MEMBERS)
    try:
        summaries = [summarize(name, args.preset) for name in names]
    except (TypeError, ValueError) as error:
        raise UserError(f"cannot build a member: {error}") from error
    if args.json:
        data = [asdict(s) for s in summaries]
        print(json.dumps(data[0] if args.member else data, indent=2))
    elif args.member:
        print(format_member(summaries[0], args.preset))
    else:
        print(format_table(summaries, args.preset))
    return 0


__all__ = ["MemberSummary", "StageSummary", "format_member", "format_table", "main", "summarize"]
