import subprocess
import sys

from insightedit import __version__
from insightedit.cli import main


def test_help_lists_lightning_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "data", "zoo", "plan"):
        assert f"  {command} " in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"insightedit {__version__}"


def test_unknown_command_is_one_line_and_exit_2(capsys):
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown command")


def test_no_arguments_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: insightedit" in capsys.readouterr().out


def test_python_dash_m_runs_the_same_entry_point():
    command = [sys.executable, "-m", "insightedit", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "predict" in result.stdout


def test_fit_help_comes_from_lightning(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--trainer.max_steps" in out and "--model" in out and "--data" in out


def test_help_and_the_command_table_import_no_torch():
    """Subcommands are imported when they run: ``--help`` (and the zoo's entry in it) loads no torch."""
    code = (
        "import sys; from insightedit.cli import main, EXTRA_COMMANDS; main(['--help']); "
        "assert 'zoo' in EXTRA_COMMANDS; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
