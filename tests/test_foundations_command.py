"""``insightedit foundations``: order, what each run reads from the ones before, caching, --rebuild, failures.

The runs are stubbed (each writes what its recipe would); one real run is in test_foundations_build.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

from insightedit.callbacks.held_out import HELD_OUT_FILE, HeldOutMetrics
from insightedit.cli import main
from insightedit.commands import foundations as command
from insightedit.commands.foundations import ALONE, FOUNDATIONS, STAMP, FoundationBuilder, JobSettings
from insightedit.errors import UserError
from insightedit.foundation_paths import check_foundation_paths, missing_foundations

METRICS = {"clip": {"retrieval_top1": 0.95}, "mllm": {"answer_accuracy": 0.91}}


def write_recipes(configs: Path) -> Path:
    for foundation in FOUNDATIONS:
        path = configs / foundation.config
        path.parent.mkdir(parents=True, exist_ok=True)
        steps = {"clip": 600, "mllm": 1500, "instruct_pix2pix": 1200}[foundation.name]
        path.write_text(yaml.safe_dump({"trainer": {"max_steps": steps, "val_check_interval": 200}}))
    return configs


class StubRunner:
    """Records each ``insightedit fit``; writes the run's output (``last.ckpt`` or ``export/foundation.json``)."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.settings: dict[str, JobSettings] = {}
        self.fail = fail

    def names(self) -> list[str]:
        return [Path(argv[2]).stem for argv in self.calls]

    def __call__(self, argv: list[str], settings: JobSettings = ALONE) -> int:
        self.calls.append(argv)
        name = Path(argv[2]).stem
        self.settings[name] = settings
        if name == self.fail:
            return 1
        folder = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--trainer.default_root_dir=")))
        if name in METRICS:
            (folder / "export").mkdir(parents=True, exist_ok=True)
            (folder / "export" / "foundation.json").write_text(json.dumps({"kind": name, "metric": METRICS[name]}))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "last.ckpt").write_bytes(b"")
            (folder / HELD_OUT_FILE).write_text(json.dumps({"metric": {"val/loss_diff": 0.02}, "step": 12}))
        return 0


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    return write_recipes(tmp_path / "configs")


def builder(
    root: Path, configs: Path, runner: StubRunner, lines: list[str] | None = None, **kwargs
) -> FoundationBuilder:
    report = lines.append if lines is not None else (lambda line: None)
    return FoundationBuilder(root, configs, runner=runner, report=report, **kwargs)


def test_order_and_what_each_reads(tmp_path: Path, configs: Path) -> None:
    """clip, then mllm on clip's export as its vision tower, then instruct_pix2pix on clip's text tower."""
    runner, lines = StubRunner(), []
    root = tmp_path / "f"
    outcomes = builder(root, configs, runner, lines).build()
    assert runner.names() == ["clip", "mllm", "instruct_pix2pix"]
    assert [o.name for o in outcomes] == ["clip", "mllm", "instruct_pix2pix"] and all(o.built for o in outcomes)
    clip, mllm, pix2pix = runner.calls
    assert clip == ["fit", "--config", str(configs / "tiny/foundations/clip.yaml"),
                    f"--trainer.default_root_dir={root / 'clip'}", "--overwrite"]  # fmt: skip
    assert f"--model.init_args.vision_tower={root}/clip/export" in mllm
    assert f"--model.init_args.generation.text_encoder={root}/clip/export" in pix2pix
    assert pix2pix[2] == str(configs / "tiny/instruct_pix2pix.yaml")
    assert outcomes[0].metric == {"retrieval_top1": 0.95} and outcomes[1].metric == {"answer_accuracy": 0.91}
    assert outcomes[2].metric == {"val/loss_diff": 0.02}  # what the recipe's HeldOutMetrics wrote
    assert FOUNDATIONS[2].metric_file == HeldOutMetrics().filename
    assert any(line.startswith("clip: built in ") and line.endswith("held-out retrieval_top1 0.95") for line in lines)
    assert json.loads((root / "mllm" / STAMP).read_text())["metric"] == {"answer_accuracy": 0.91}


def test_current_foundations_are_skipped(tmp_path: Path, configs: Path) -> None:
    root = tmp_path / "f"
    builder(root, configs, StubRunner()).build()
    runner, lines = StubRunner(), []
    outcomes = builder(root, configs, runner, lines).build()
    assert runner.calls == [] and not any(o.built for o in outcomes)
    assert lines[0] == f"clip: current, skipped ({root / 'clip'}; retrieval_top1 0.95)"
    assert outcomes[1].metric == {"answer_accuracy": 0.91}


def test_a_changed_recipe_rebuilds_it_and_what_reads_it(tmp_path: Path, configs: Path) -> None:
    root = tmp_path / "f"
    builder(root, configs, StubRunner()).build()
    pix2pix = configs / "tiny/instruct_pix2pix.yaml"
    pix2pix.write_text(pix2pix.read_text() + "# changed\n")
    runner = StubRunner()
    builder(root, configs, runner).build()
    assert runner.names() == ["instruct_pix2pix"]  # nothing reads it
    clip = configs / "tiny/foundations/clip.yaml"
    clip.write_text(clip.read_text() + "# changed\n")
    runner = StubRunner()
    builder(root, configs, runner).build()
    assert runner.names() == ["clip", "mllm", "instruct_pix2pix"]  # both read clip's export


def test_missing_output_or_other_settings_rebuild(tmp_path: Path, configs: Path) -> None:
    root = tmp_path / "f"
    builder(root, configs, StubRunner()).build()
    (root / "mllm" / "export" / "foundation.json").unlink()
    runner = StubRunner()
    builder(root, configs, runner).build()
    assert runner.names() == ["mllm"]  # instruct_pix2pix does not read mllm
    runner = StubRunner()
    builder(root, configs, runner, steps_scale=0.01).build()  # a smoke build is not the default one
    assert runner.names() == ["clip", "mllm", "instruct_pix2pix"]
    runner = StubRunner()
    builder(root, configs, runner, rebuild=True).build()
    assert runner.names() == ["clip", "mllm", "instruct_pix2pix"]


def test_steps_scale(tmp_path: Path, configs: Path) -> None:
    """max_steps scaled (at least 1) and validation kept inside the run."""
    runner = StubRunner()
    builder(tmp_path / "f", configs, runner, steps_scale=0.01).build()
    clip, mllm, pix2pix = runner.calls
    assert "--trainer.max_steps=6" in clip and "--trainer.val_check_interval=6" in clip
    assert "--trainer.max_steps=15" in mllm and "--trainer.max_steps=12" in pix2pix
    runner = StubRunner()
    builder(tmp_path / "g", configs, runner, steps_scale=0.5).build()
    assert "--trainer.max_steps=300" in runner.calls[0]
    assert not any(a.startswith("--trainer.val_check_interval") for a in runner.calls[0])


def test_a_failed_run_is_one_line_and_stops(tmp_path: Path, configs: Path) -> None:
    runner = StubRunner(fail="mllm")
    with pytest.raises(UserError) as error:
        builder(tmp_path / "f", configs, runner).build()
    assert runner.names() == ["clip", "mllm"]
    message = str(error.value)
    assert "\n" not in message and message.startswith("foundations: mllm failed (insightedit fit exited 1 after ")
    assert not (tmp_path / "f" / "mllm" / STAMP).exists()


class SideBySideRunner(StubRunner):
    """A stub whose mllm and instruct_pix2pix runs each wait for the other to start: they must overlap."""

    def __init__(self, fail: str | None = None) -> None:
        super().__init__(fail)
        self.together = threading.Barrier(2, timeout=120)
        self.order: list[str] = []

    def __call__(self, argv: list[str], settings: JobSettings = ALONE) -> int:
        name = Path(argv[2]).stem
        self.order.append(f"start {name}")
        if name != "clip":
            self.together.wait()  # BrokenBarrierError if the other never starts while this one runs
        code = super().__call__(argv, settings)
        self.order.append(f"end {name}")
        return code


def test_side_by_side(tmp_path: Path, configs: Path) -> None:
    """--jobs 2: clip alone with both threads, then mllm and instruct_pix2pix together with one each."""
    runner, lines = SideBySideRunner(), []
    outcomes = builder(tmp_path / "f", configs, runner, lines, jobs=2).build()
    assert [o.name for o in outcomes] == ["clip", "mllm", "instruct_pix2pix"] and all(o.built for o in outcomes)
    assert runner.order[:2] == ["start clip", "end clip"]
    assert sorted(runner.order[2:4]) == ["start instruct_pix2pix", "start mllm"]
    assert runner.settings == {
        "clip": JobSettings(threads=2, label="clip"),
        "mllm": JobSettings(threads=1, label="mllm"),
        "instruct_pix2pix": JobSettings(threads=1, label="instruct_pix2pix"),
    }
    assert "clip: building into " in lines[0] and " (2 threads): insightedit fit " in lines[0]
    stamp = json.loads((tmp_path / "f" / "mllm" / STAMP).read_text())
    assert stamp["threads"] == 1 and stamp["metric"] == METRICS["mllm"]
    # the stamps are the sequential build's: nothing is rebuilt one job at a time
    again = StubRunner()
    builder(tmp_path / "f", configs, again).build()
    assert again.calls == []


def test_side_by_side_failure_lets_the_other_finish(tmp_path: Path, configs: Path) -> None:
    runner = SideBySideRunner(fail="instruct_pix2pix")
    with pytest.raises(UserError, match=r"^foundations: instruct_pix2pix failed \(insightedit fit exited 1"):
        builder(tmp_path / "f", configs, runner, jobs=2).build()
    assert (tmp_path / "f" / "mllm" / STAMP).is_file()  # the run under way finished and was stamped
    assert not (tmp_path / "f" / "instruct_pix2pix" / STAMP).exists()
    runner = StubRunner(fail="clip")
    with pytest.raises(UserError, match="^foundations: clip failed"):
        builder(tmp_path / "g", configs, runner, jobs=2).build()
    assert runner.names() == ["clip"]  # nothing that reads it started


def test_child_threads_and_labels(monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """The run's thread count goes to INSIGHTEDIT_THREADS unless the user chose one; a label prefixes each line."""
    monkeypatch.delenv("INSIGHTEDIT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert command._child_environment(JobSettings(threads=2))["INSIGHTEDIT_THREADS"] == "2"
    assert "INSIGHTEDIT_THREADS" not in command._child_environment(JobSettings())
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "INSIGHTEDIT_THREADS" not in command._child_environment(JobSettings(threads=2))
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("INSIGHTEDIT_THREADS", "4")
    assert command._child_environment(JobSettings(threads=2))["INSIGHTEDIT_THREADS"] == "4"
    code = command.subprocess_runner(["foundations", "--jobs", "0"], JobSettings(label="clip"))
    assert code == 2
    out = capfd.readouterr().out
    assert out.startswith("[clip] error: insightedit foundations: --jobs must be >= 1, got 0")


def test_command_line(tmp_path: Path, configs: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``insightedit foundations``: the root from --out or $INSIGHTEDIT_FOUNDATIONS; a failure exits non-zero."""
    runner = StubRunner()
    monkeypatch.setattr(command, "subprocess_runner", runner)
    monkeypatch.setenv("INSIGHTEDIT_FOUNDATIONS", str(tmp_path / "env"))
    assert main(["foundations", "--configs", str(configs)]) == 0
    assert runner.calls[0][3] == f"--trainer.default_root_dir={tmp_path / 'env' / 'clip'}"
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith(f"foundations in {tmp_path / 'env'}: clip, mllm, instruct_pix2pix built, ")
    monkeypatch.setattr(command, "subprocess_runner", StubRunner(fail="clip"))
    assert main(["foundations", "--configs", str(configs), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: foundations: clip failed (insightedit fit exited 1")
    assert main(["foundations", "--steps-scale", "0"]) == 2
    assert main(["foundations", "--configs", str(tmp_path / "none")]) == 2
    assert "recipe" in capsys.readouterr().err


def test_a_missing_foundation_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight option naming an unbuilt foundation (in a ``foundations`` folder or the root): how to build it."""
    root = tmp_path / "root"
    monkeypatch.setenv("INSIGHTEDIT_FOUNDATIONS", str(root))
    monkeypatch.chdir(tmp_path)  # the relative path below must not find a checkout's built foundations
    init_args = {
        "comprehension": {"pretrained": str(root / "mllm" / "export")},
        "generation": {"pretrained": "checkpoints/tiny/foundations/instruct_pix2pix/last.ckpt", "text_encoder": None},
        "bridging": {"clip_pretrained": str(tmp_path / "elsewhere" / "clip.pt")},  # not a foundation: the loader's
    }
    assert missing_foundations(init_args) == [
        ("comprehension.pretrained", str(root / "mllm" / "export")),
        ("generation.pretrained", "checkpoints/tiny/foundations/instruct_pix2pix/last.ckpt"),
    ]
    with pytest.raises(UserError) as error:
        check_foundation_paths(init_args)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"comprehension.pretrained: {root}/mllm/export not found (and 1")
    assert "`insightedit foundations`" in message
    (root / "mllm" / "export").mkdir(parents=True)
    assert [option for option, _ in missing_foundations(init_args)] == ["generation.pretrained"]
