"""Argument errors: exact option names (no abbreviations), one line with the closest name, exit status 2."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from insightedit.cli import main
from insightedit.cli_precheck import TRAINER_ARGUMENTS, check_trainer_options
from insightedit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "lightning_configs" / "tiny" / "stage1.yaml")


def test_the_trainer_list_is_lightnings():
    from lightning.pytorch import Trainer

    assert TRAINER_ARGUMENTS == tuple(inspect.signature(Trainer).parameters)


@pytest.mark.parametrize(
    "argv",
    [
        ["--trainer.max_steps=5"],
        ["--trainer.max_steps", "5"],
        ["--trainer.logger.init_args.project=x"],
        ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"],
        ["--trainer.callbacks+", "lightning.pytorch.callbacks.LearningRateMonitor"],
        ["--data.init_args.max_step=5"],  # not the trainer's: left to the parser
    ],
)
def test_the_trainer_precheck_passes_valid_options(argv):
    check_trainer_options(argv)


def test_an_unknown_trainer_option_answers_before_lightning_is_imported():
    code = (
        "import sys\nfrom insightedit.cli import main\n"
        f"code = main(['fit', '--config', {TINY!r}, '--trainer.max_step=5'])\n"
        "print(code, 'torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.split() == ["2", "False", "False"], run.stderr
    assert run.stderr.strip() == "error: unknown option --trainer.max_step; did you mean --trainer.max_steps?"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--seed_everythin=1"], "unknown option --seed_everythin; did you mean --seed_everything?"),
        (["--seed_every=1"], "unknown option --seed_every; did you mean --seed_everything?"),  # no abbreviations
        (["--ckpt_pat", "x"], "unknown option --ckpt_pat; did you mean --ckpt_path?"),
        (["--model.init_args.stag=3"], "unknown option --model.init_args.stag; did you mean --model.init_args.stage?"),
        (["--data.init_args.batch_siz=2"], "did you mean --data.init_args.batch_size?"),
        (["--trainer.max_steps=abc"], "Parser key \"trainer.max_steps\": Expected a <class 'int'>. Got value: abc"),
    ],
)
def test_parser_errors_are_one_line_with_a_suggestion(extra, expected, capsys):
    """What the pre-check leaves to Lightning's parser: one line too, no usage."""
    from insightedit.lightning_cli import run_lightning_cli

    assert run_lightning_cli(["fit", "--config", TINY, *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(expected), captured.err
    assert "usage" not in captured.err + captured.out


def test_fit_help_still_works(capsys):
    from insightedit.lightning_cli import run_lightning_cli

    assert run_lightning_cli(["fit", "--help"]) == 0
    assert "--trainer.max_steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["edit", "--lamda", "1"], "insightedit edit: unknown option --lamda; did you mean --lambda?"),
        (
            ["edit", "--lamb", "1", "--model", "m", "--image", "i.png", "--instruction", "x", "--out", "o.png"],
            "insightedit edit: unknown option --lamb; did you mean --lambda?",  # not taken for --lambda
        ),
        (["export", "--ckpt_pat", "x", "--out", "y"], "insightedit export: unknown option --ckpt_pat; did you mean"),
        (["zoo", "--foo"], "insightedit zoo: unknown option --foo"),
        (["data", "check", "--quik", "x"], "insightedit data: unknown option --quik; did you mean --quick?"),
    ],
)
def test_extra_commands_are_exact_and_one_line(argv, expected, capsys):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines


def test_command_parser_takes_exact_names_only():
    from insightedit.commands.parsing import CommandParser

    parser = CommandParser(prog="p")
    parser.add_argument("--steps", type=int, default=1)
    assert parser.parse_args(["--steps", "3"]).steps == 3
    with pytest.raises(UserError, match="^p: unknown option --step; did you mean --steps\\?$"):
        parser.parse_args(["--step", "3"])
