"""The argument parser of the extra commands (``edit``, ``export``, ``plan``...): exact names, one-line errors.

argparse accepts any unambiguous prefix of an option (``--lamb`` for ``--lambda``) and answers a mistake
with the usage and the message. :class:`CommandParser` takes exact names only and raises one
:class:`UserError` line instead (``insightedit edit: unknown option --lamda; did you mean --lambda?``),
which the CLI prints as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from insightedit.errors import UserError


class CommandParser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` without abbreviations whose errors are one :class:`UserError` line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        if kwargs.get("description"):
            kwargs["description"] = plain_text(kwargs["description"])
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """argparse's, keeping ``args`` for the error message (subcommands' parsers get theirs too)."""
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        """Raise ``PROG: MESSAGE`` (an unknown option: with the closest known name) instead of printing usage.

        An unknown option is named even where argparse would first complain of a missing required one
        (``--lamda`` for ``--lambda``).
        """
        known = sorted({name for each in _parsers(self) for action in each._actions for name in action.option_strings})
        unrecognized = re.match(r"unrecognized arguments: (\S+)", message)
        given = [token.split("=", 1)[0] for token in getattr(self, "_given", []) if token.startswith("--")]
        unknown = unrecognized.group(1).split("=", 1)[0] if unrecognized else None
        if unknown is None and message.startswith("the following arguments are required"):
            unknown = next((option for option in given if option not in known), None)
        if unknown is not None:
            names = {option.lstrip("-"): option for option in known}
            close = difflib.get_close_matches(unknown.lstrip("-"), list(names), n=1) if unknown.startswith("-") else []
            hint = f"; did you mean {names[close[0]]}?" if close else ""
            message = f"unknown {'option' if unknown.startswith('-') else 'argument'} {unknown}{hint}"
        raise UserError(f"{self.prog}: {message}")


def plain_text(docstring: str) -> str:
    """``docstring`` without reStructuredText markup (````code````, ``:class:`name```), for ``--help``."""
    text = re.sub(r":[\w:]+:`~?([^`]+)`", r"\1", docstring)
    return re.sub(r"``([^`]+)``", r"\1", text)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and its subcommands' parsers."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)
