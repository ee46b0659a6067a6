"""The argument parser of ``insightedit fit|validate|test|predict``: exact option names, one-line errors.

Lightning's parser (jsonargparse on argparse) accepts any unambiguous prefix of an option, so a typo such
as ``--trainer.max_step=5`` silently runs as ``--trainer.max_steps=5``; and every error prints the whole
usage (about 50 lines) before the message. :class:`InsightEditArgumentParser` turns abbreviations off
(``allow_abbrev=False``, also in every subcommand's parser) and reports an error as one line,
``error: unknown option --trainer.max_step; did you mean --trainer.max_steps?``, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from insightedit.cli_precheck import option_values, unknown_option


class InsightEditArgumentParser(LightningArgumentParser):
    """:class:`LightningArgumentParser` without abbreviations, whose errors are one line with a suggestion."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._command_line: list[str] = []

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Parse ``args``, keeping them for the error message (which option, and its section's class)."""
        self._command_line = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        """Print ``error: <one line>`` (with the closest option name, if any) and exit with status 2."""
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"error: {one_line_error(self, message, self._command_line)}\n")
        self.exit(2)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and its subcommands' parsers."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def _option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--option`` that ``parser`` and its subcommands know."""
    return {name for each in _parsers(parser) for action in each._actions for name in action.option_strings}


def _suggest(option: str, known: set[str]) -> str:
    """The one-line message for an unknown ``option``, suggesting a known name of the same section."""
    prefix, dot, name = option.rpartition(".")
    if not dot:
        prefix, name = "--", option.lstrip("-")
        siblings = [known_name[2:] for known_name in known if known_name.startswith("--") and "." not in known_name]
    else:
        prefix += "."
        siblings = [known_name[len(prefix) :] for known_name in known if known_name.startswith(prefix)]
        siblings = [sibling for sibling in siblings if "." not in sibling]
    return str(unknown_option(prefix, name, siblings))


def _class_parameters(command_line: list[str], section: str) -> list[str]:
    """The ``__init__`` parameters of the class that ``section`` (``model``, ``data``) names, or ``[]``."""
    from insightedit.training.composition import merge_config_files

    pairs = option_values(command_line)
    class_paths = [value for option, value in pairs if option == f"--{section}.class_path" and value]
    class_path = class_paths[-1] if class_paths else None
    if class_path is None:
        try:
            configs = merge_config_files([value for option, value in pairs if option == "--config" and value])
        except Exception:  # the parser reports a bad config itself
            return []
        class_path = (configs.get(section) or {}).get("class_path")
    try:
        module, _, name = str(class_path).rpartition(".")
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def one_line_error(parser: argparse.ArgumentParser, message: str, command_line: list[str]) -> str:
    """The parser's ``message`` as one line; an unknown option names the closest known one."""
    unrecognized = re.match(r"unrecognized arguments: (\S+)", message)
    if unrecognized:
        return _suggest(unrecognized.group(1).split("=", 1)[0], _option_names(parser))
    not_accepted = re.search(r"Option '([^']+)' is not accepted", message)
    if not_accepted:  # a key of a class's init_args (``--model.init_args.stag``)
        key = not_accepted.group(1)
        pattern = re.compile(rf"^--([\w.]+)\.{re.escape(key)}(=.*)?$")
        for token in command_line:
            found = pattern.match(token)
            if found:
                known = _class_parameters(command_line, found.group(1).split(".")[0])
                return str(unknown_option(f"--{found.group(1)}.", key, known))
        return f"unknown option {key}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    reasons = [index for index, line in enumerate(lines) if line.startswith("- ") and "NoneType" not in line]
    if not reasons:
        return " ".join(lines[:2]) or "invalid arguments"
    first = reasons[0]  # the most specific reason of a nested report, and its detail line
    detail = lines[first + 1 : first + 2] if lines[first].endswith(":") else []
    return " ".join([lines[0], lines[first][2:], *detail])
