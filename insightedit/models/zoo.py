"""The registry of the zoo's members: name → paper, what it conditions on, config sections, builder.

Adding a member is one model file (an :class:`~insightedit.models.editor.Editor` subclass and a build
function), one entry here, and a tiny and a full-size yaml in the configs folder (docs/zoo.md).
Builders are named as ``module:function`` and imported only when that member is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from insightedit.errors import UserError
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


__all__ = ["MEMBERS", "SECTIONS", "Member", "build_editor", "get_member"]
