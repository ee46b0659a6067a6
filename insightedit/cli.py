"""The ``insightedit`` command: one entry point, one dispatcher.

``fit``, ``validate``, ``test`` and ``predict`` go to :class:`lightning.pytorch.cli.LightningCLI`;
every other subcommand lives in a module of :mod:`insightedit.commands` and is imported only when it
runs, so ``insightedit --help`` and ``insightedit --version`` answer without importing torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from insightedit import __version__
from insightedit.console import quiet_library_noise
from insightedit.errors import UserError

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "Train a model (a stage of the system, or one module on its own).",
    "validate": "Run one evaluation epoch over the validation set.",
    "test": "Edit the evaluation set and score it with the paper's metrics.",
    "predict": "Run inference over a dataset.",
}

# name -> ("module:function", one-line summary). Each function takes the remaining argv and
# returns an exit code. Add a subcommand by adding a line here.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("insightedit.commands.data:main", "Make, check and convert AdvancedEdit datasets."),
    "zoo": ("insightedit.commands.zoo:main", "The zoo's members: what each reads, its size and its stages."),
    "foundations": (
        "insightedit.commands.foundations:main",
        "Build the tiny twin's pretrained parts (CLIP, MLLM, InstructPix2Pix), cached.",
    ),
    "plan": ("insightedit.commands.plan:main", "Parameters and memory per device of a config, before any download."),
    "evaluate": ("insightedit.commands.evaluate:main", "Score a folder of edited images with a named protocol."),
    "export": ("insightedit.commands.export:main", "Turn a checkpoint into a self-contained model folder."),
    "edit": ("insightedit.commands.edit:main", "Edit an image with an exported model folder."),
    "demo": ("insightedit.commands.demo:main", "A local web demo (Gradio) of an exported model folder."),
}


def _usage() -> str:
    lines = [
        f"insightedit {__version__}: a zoo of instruction-based image editors (InsightEdit and its relatives).",
        "",
        "usage: insightedit <command> [options]      (insightedit <command> --help for its options)",
        "",
        "commands:",
    ]
    width = max(len(name) for name in [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS])
    for name, summary in LIGHTNING_COMMANDS.items():
        lines.append(f"  {name:<{width}} {summary}")
    for name, (_, summary) in EXTRA_COMMANDS.items():
        lines.append(f"  {name:<{width}} {summary}")
    lines += [
        "",
        "options:",
        "  -h, --help   show this message and exit",
        "  --version    print the version and exit",
    ]
    return "\n".join(lines)


def _run_extra(name: str, argv: list[str]) -> int:
    target, _ = EXTRA_COMMANDS[name]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv) or 0)


def main(args: Sequence[str] | None = None) -> int:
    """Run the ``insightedit`` command with ``args`` (``sys.argv[1:]`` when ``None``); return the exit code."""
    quiet_library_noise()  # library notices that do not apply here (insightedit/console.py), before any import
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"insightedit {__version__}")
        return 0
    command = argv[0]
    try:
        from insightedit.threads import configure_threads

        configure_threads()  # OpenMP waits that hold up on shared cores, before torch loads (insightedit/threads.py)
        if command in LIGHTNING_COMMANDS:
            from insightedit.cli_precheck import precheck

            precheck(argv[1:])  # common mistakes answered before Lightning and the models are imported
            import torch  # noqa: F401  (before pad_heap: see insightedit/allocator.py)

            from insightedit.allocator import pad_heap

            pad_heap()  # freed activations stay in the heap instead of page-faulting back every step
            from insightedit.lightning_cli import run_lightning_cli

            return run_lightning_cli(argv)
        if command in EXTRA_COMMANDS:
            return _run_extra(command, argv[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"error: unknown command {command!r}; run 'insightedit --help' for the list", file=sys.stderr)
    return 2
