"""The extra commands' help is plain text with defaults; edit's status line; the demo's PNG; models/ ignored."""

import io
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from insightedit.cli import EXTRA_COMMANDS, main
from insightedit.commands.edit import StatusLine
from insightedit.commands.parsing import plain_text
from insightedit.pipeline.images import DEFAULT_MAX_PIXELS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(EXTRA_COMMANDS))
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: insightedit {command}" in out
    assert "``" not in out and ":class:" not in out and ":mod:" not in out


def test_edit_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"(default {DEFAULT_MAX_PIXELS:,})" in out  # --max-pixels
    assert "--lambda LAMBDA λ, the image branch's weight (members with one; default: the model folder's own" in out
    for default in ("s_T (default 7.5)", "s_I (default 1.5)", "(default 20)", "(default ddim)", "Default: full"):
        assert default in out


def test_plain_text_drops_rst_markup():
    text = "``insightedit edit``: uses :class:`~insightedit.pipeline.EditPipeline` and :mod:`x.y`."
    assert plain_text(text) == "insightedit edit: uses insightedit.pipeline.EditPipeline and x.y."


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_only_on_a_terminal():
    piped = io.StringIO()
    with StatusLine(piped) as status:
        status.show("loading m ...")
    assert piped.getvalue() == ""  # logs get only the final 'wrote ...' line
    terminal = FakeTerminal()
    with StatusLine(terminal) as status:
        status.show("loading m ...")
        status.show("editing a.png: 20 denoising steps (ddim) on cpu ...")
    assert terminal.getvalue() == (
        "\r\033[Kloading m ...\r\033[Kediting a.png: 20 denoising steps (ddim) on cpu ...\r\033[K"
    )  # each stage replaces the last; the line is erased at the end


def test_the_demo_returns_png():
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'insightedit[demo]'")
    from insightedit.commands.demo import build_demo

    unet = SimpleNamespace(image_scale=1.0)
    pipeline = SimpleNamespace(generation=SimpleNamespace(unet=unet), member="insightedit", has_image_branch=True)
    demo = build_demo(pipeline)
    results = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "result"]
    assert len(results) == 1 and results[0].format == "png"


def test_exported_models_folder_is_ignored():
    run = subprocess.run(
        ["git", "check-ignore", "--no-index", "models/tiny/model_index.json"], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "models/tiny/model_index.json"
    kept = subprocess.run(["git", "check-ignore", "--no-index", "insightedit/models/zoo.py"], cwd=REPO)
    assert kept.returncode == 1  # the package's models/ is not
