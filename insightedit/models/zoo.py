"""The registry of the zoo's members: name → paper, what it conditions on, config sections, builder.

Adding a member is one model file (an :class:`~insightedit.models.editor.Editor` subclass and a build
function), one entry here, and a tiny and a full-size yaml in the configs folder (docs/zoo.md).
Builders are named as ``module:function`` and imported only when that member is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from insightedit.errors import UserError

if TYPE_CHECKING:  # the registry imports no torch: the CLI's light checks read it
    from insightedit.models.editor import Editor

SECTIONS = ("comprehension", "bridging", "generation", "head")


@dataclass(frozen=True)
class Member:
    """One editor of the zoo."""

    name: str
    paper: str
    conditions: str  # what the UNet reads, in words
    sections: tuple[str, ...]  # the config sections its builder reads (others must be left empty)
    builder: str  # "module:function", called as builder(preset=..., <sections>..., **options)
    editor: str  # "module:Class", the member's Editor subclass (its groups, losses and stages)
    options: tuple[str, ...] = ()  # member options beyond the sections (e.g. align_target)
    defaults: tuple[tuple[str, Any], ...] = ()  # fixed keyword arguments of the builder

    def build_function(self) -> Callable[..., Editor]:
        """The builder, imported now."""
        return _load(self.builder)  # type: ignore[no-any-return]

    def editor_class(self) -> type[Editor]:
        """The member's :class:`Editor` subclass, imported now."""
        return _load(self.editor)  # type: ignore[no-any-return]


def _load(reference: str) -> Any:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


_MLLM = "insightedit.models.members.insightedit:build_mllm_editor"
MEMBERS: dict[str, Member] = {
    member.name: member
    for member in (
        Member(
            "instruct_pix2pix",
            "InstructPix2Pix (Brooks et al., CVPR 2023)",
            "CLIP text encoding of the instruction",
            ("generation",),
            "insightedit.models.members.instruct_pix2pix:build_instruct_pix2pix",
            "insightedit.models.members.instruct_pix2pix:InstructPix2PixEditor",
        ),
        Member(
            "mgie",
            "MGIE (Fu et al., ICLR 2024)",
            "MLLM visual tokens → edit head (77 queries)",
            ("comprehension", "generation", "head"),
            "insightedit.models.members.mgie:build_mgie",
            "insightedit.models.members.mgie:MGIEEditor",
        ),
        Member(
            "smartedit",
            "SmartEdit (Huang et al., CVPR 2024)",
            "MLLM [MM] → Q-Former → BIM (f_txt, v_txt)",
            ("comprehension", "bridging", "generation"),
            _MLLM,
            "insightedit.models.members.insightedit:SmartEditEditor",
            ("align_target",),
            (("member", "smartedit"),),
        ),
        Member(
            "insightedit_no_iaa",
            "InsightEdit w/o IAA (ablation)",
            "MLLM [MM] → Q-Former → BIM (f_txt, v_txt)",
            ("comprehension", "bridging", "generation"),
            _MLLM,
            "insightedit.models.members.insightedit:InsightEditNoIAAEditor",
            ("align_target",),
            (("member", "insightedit_no_iaa"),),
        ),
        Member(
            "insightedit_no_bim",
            "InsightEdit w/o BIM (ablation)",
            "MLLM [MM] → Q-Former (f_txt) + IAA (f_img)",
            ("comprehension", "bridging", "generation"),
            _MLLM,
            "insightedit.models.members.insightedit:InsightEditNoBIMEditor",
            ("align_target",),
            (("member", "insightedit_no_bim"),),
        ),
        Member(
            "insightedit",
            "InsightEdit (Xu et al., CVPR 2025)",
            "MLLM [MM] → Q-Former → BIM (f_txt, v_txt) + IAA (f_img)",
            ("comprehension", "bridging", "generation"),
            _MLLM,
            "insightedit.models.members.insightedit:InsightEditEditor",
            ("align_target",),
            (("member", "insightedit"),),
        ),
    )
}


def get_member(name: str) -> Member:
    """The member called ``name``; a :class:`UserError` listing the members otherwise."""
    if name not in MEMBERS:
        raise UserError(f"unknown member {name!r}; the zoo has {', '.join(MEMBERS)}")
    return MEMBERS[name]


def build_editor(
    member: str, preset: str = "tiny", sections: dict[str, dict[str, Any] | None] | None = None, **options: Any
) -> Editor:
    """Build ``member`` of ``preset`` from its config ``sections`` and options (``None`` options: defaults)."""
    entry = get_member(member)
    given = {name: value for name, value in (sections or {}).items() if value}
    unused = sorted(set(given) - set(entry.sections))
    if unused:
        raise UserError(f"member {member} has no {', '.join(unused)} section (it reads {', '.join(entry.sections)})")
    unknown = sorted(name for name, value in options.items() if value is not None and name not in entry.options)
    if unknown:
        raise UserError(f"member {member} takes no option {', '.join(unknown)}")
    arguments: dict[str, Any] = dict(entry.defaults)
    arguments.update({name: given.get(name) for name in entry.sections})
    arguments.update({name: value for name, value in options.items() if value is not None})
    return entry.build_function()(preset=preset, **arguments)


def _deep_merge(base: Any, override: Any) -> Any:
    """``override`` over ``base``: mappings merge key by key, anything else is replaced (as configs compose)."""
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _deep_merge(base[key], value) if key in base else value
        return merged
    return override


def apply_section_overrides(
    member: str, sections: Mapping[str, Any], overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``sections`` with ``overrides`` (``{section: {key: value}}``) merged over those ``member`` reads.

    An overlay meant for every member (``lightning_configs/full_width_cpu.yaml``) names settings of parts
    some members lack (InstructPix2Pix has no ``comprehension``); given as a section, :func:`build_editor`
    refuses them. Given in ``section_overrides`` they apply to the sections the member reads, deep-merged
    over what the config gives (later wins), and are skipped for the others. Section names other than
    :data:`SECTIONS`, or values that are not mappings, are a :class:`UserError`.
    """
    resolved = dict(sections)
    if not overrides:
        return resolved
    if not isinstance(overrides, Mapping):
        raise UserError(f"section_overrides must map section names to settings, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(SECTIONS))
    if unknown:
        raise UserError(f"section_overrides has no section {', '.join(unknown)} (sections: {', '.join(SECTIONS)})")
    reads = get_member(member).sections
    for name, settings in overrides.items():
        if settings is not None and not isinstance(settings, Mapping):
            raise UserError(f"section_overrides.{name} must be a mapping of settings, got {settings!r}")
        if settings and name in reads:
            resolved[name] = _deep_merge(dict(resolved.get(name) or {}), settings)
    return resolved


def resolve_section_overrides(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """``model.init_args`` of an ``EditorSystem`` with its ``section_overrides`` applied and removed.

    What reads sections from a config without building the system (``insightedit plan``, the weight
    checks before ``fit``) calls this, so it sees the sections the system builds from.
    """
    resolved = dict(init_args)
    overrides = resolved.pop("section_overrides", None)
    if not overrides:
        return resolved
    member = str(resolved.get("member") or "insightedit")
    applied = apply_section_overrides(member, {name: resolved.get(name) for name in SECTIONS}, overrides)
    return resolved | {name: value for name, value in applied.items() if name in resolved or value is not None}


__all__ = [
    "MEMBERS",
    "SECTIONS",
    "Member",
    "apply_section_overrides",
    "build_editor",
    "get_member",
    "resolve_section_overrides",
]
