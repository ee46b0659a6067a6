"""The README's "Set up, run, test" command lines, in order, in a temporary folder.

The lines are read from README.md (so editing the README in a way that breaks the chain breaks this
test) and expanded by bash (variables, line continuations, comments), with ``insightedit`` and ``cp``
recorded instead of run. Then:

* every step reads what the step before it made: each chained stage starts from the previous stage's
  ``last.ckpt`` (the configs name the foundations' UNet), every ``fit`` writes a folder of its own, ``test`` and
  ``export`` read the chained stage 3, ``edit`` reads the exported folder (no run, fast);
* the main job into a folder that holds a run: refused in one line before anything is built;
  ``--overwrite`` starts over without a ``last-v1.ckpt`` (one tiny in-process fit); and
  ``--trainer.default_root_dir`` moves the checkpoints and the W&B run (the parsed config);
* the whole walk, run in process with tiny step counts (slow): each step's files are where the next
  step looks for them, each ``config.yaml`` records the folder really used, the console says what
  ``init_from`` and ``generation.pretrained`` loaded, and the main job's folder is left as it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from insightedit.cli import main
from insightedit.lightning_cli import InsightEditCLI

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Set up, run, test"
MAIN_JOB = ["insightedit", "fit", "--config", "lightning_configs/tiny/stage3.yaml"]
# installs, the foundations (the session fixture's micro-foundations stand in: tests/_foundations.py) and the
# test suite: not part of the walk
SKIPPED = ("python3 -m venv", "pip install", "insightedit foundations", "python -m pytest")
SEPARATOR = "\x1f"

# what each subcommand gets appended in the runs here: one step, no validation, a 16-scene data set
FAST_FIT = [
    "--trainer.max_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.batch_size=2",
]
FAST_TEST = ["--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=2"]
FAST_EDIT = ["--steps", "2"]


# ------------------------------------------------------------------------------------ reading
def section_lines(readme: str) -> list[str]:
    """The lines of the section's bash blocks that the walk runs (continuations joined), in order."""
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in textwrap.dedent(block).replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith(SKIPPED):
                lines.append(line)
    return lines


def readme_commands(readme: str | None = None) -> list[list[str]]:
    """The section's ``insightedit`` and ``cp`` command lines as bash expands them, in order."""
    lines = section_lines(readme if readme is not None else (REPO / "README.md").read_text())
    unknown = [line for line in lines if not re.match(r"(insightedit|cp)\s|[A-Z_]+=", line)]
    assert not unknown, f"README lines this walk does not know how to run: {unknown}"
    record = 'printf "%s" "$1"; shift; for a in "$@"; do printf "\\x1f%s" "$a"; done; printf "\\n"'
    script = "\n".join([f"insightedit() {{ set -- insightedit \"$@\"; {record}; }}",
                        f"cp() {{ set -- cp \"$@\"; {record}; }}", *lines])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return [line.split(SEPARATOR) for line in out.splitlines()]


def option(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``argv`` (the last one given)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def config_of(argv: list[str]) -> dict:
    path = option(argv, "--config")
    assert path, f"no --config in {argv}"
    return yaml.safe_load((REPO / path).read_text())


def run_folder(argv: list[str]) -> str:
    """Where a ``fit``/``test`` writes: ``--trainer.default_root_dir``, else its config's."""
    folder = option(argv, "--trainer.default_root_dir") or config_of(argv)["trainer"]["default_root_dir"]
    return os.path.normpath(folder)


def last_checkpoint(folder: str) -> str:
    return os.path.normpath(os.path.join(folder, "last.ckpt"))


def norm(path: str | None) -> str | None:
    return os.path.normpath(path) if path else None


# ------------------------------------------------------------------------------------- wiring
def walk(commands: list[list[str]]) -> dict[str, list[str]]:
    """Name each step of the README's walk and check that it reads what the step before it made."""
    assert commands[0] == MAIN_JOB, f"the main job changed: {commands[0]}"
    fits = [c for c in commands if c[:2] == ["insightedit", "fit"]]
    folders = [run_folder(c) for c in fits]
    assert len(set(folders)) == len(folders), f"two fits write into one folder: {folders}"
    configs = [Path(option(c, "--config") or "").name for c in fits]
    assert configs == ["stage3.yaml", "stage1.yaml", "stage2.yaml", "stage3.yaml"], configs
    main_job, stage1, stage2, stage3 = fits  # the tiny configs name the foundations' InstructPix2Pix stand-in
    assert option(stage1, "--model.init_args.init_from") is None
    for previous, stage in ((stage1, stage2), (stage2, stage3)):
        assert norm(option(stage, "--model.init_args.init_from")) == last_checkpoint(run_folder(previous))
    rest = commands[len(fits):]
    assert [c[1] if c[0] == "insightedit" else c[0] for c in rest] == ["test", "export", "cp", "edit"], rest
    test, export, copy, edit = rest
    chained = last_checkpoint(run_folder(stage3))
    assert norm(option(test, "--ckpt_path")) == chained, "test does not score the chained stage 3"
    assert run_folder(test) == run_folder(stage3), "test writes outside the folder of the model it scores"
    assert norm(option(export, "--ckpt_path")) == chained, "export does not read the chained stage 3"
    assert norm(option(edit, "--model")) == norm(option(export, "--out")), "edit does not read the exported model"
    assert norm(option(edit, "--image")) == norm(copy[2]), "edit does not read the copied image"
    synthetic = config_of(main_job)["data"]["init_args"]["synthetic"]
    data_root = f"data/synthetic-n{synthetic['num_images']}-s{synthetic['size']}-seed{synthetic['seed']}"
    assert Path(copy[1]).parts[:2] == Path(data_root).parts, f"cp reads outside the synthetic set {data_root}"
    return {"main job": main_job, "stage 1": stage1, "stage 2": stage2, "stage 3": stage3,
            "test": test, "export": export, "cp": copy, "edit": edit, "data_root": [data_root]}


def test_each_readme_command_reads_what_the_previous_one_made():
    walk(readme_commands())


def test_the_walk_notices_a_readme_whose_chain_is_broken():
    readme = (REPO / "README.md").read_text()
    walk(readme_commands(readme))
    for old, new in [
        ("--trainer.default_root_dir=$CHAIN/stage3", ""),  # stage 3 into the main job's folder again
        ("init_from=$CHAIN/stage2/last.ckpt", "init_from=$CHAIN/stage1/last.ckpt"),
        ("chain/stage3/last.ckpt --out", "stage3/last.ckpt --out"),  # export the main job's model
    ]:
        assert old in readme, old
        with pytest.raises(AssertionError):
            walk(readme_commands(readme.replace(old, new, 1)))


# --------------------------------------------------------------------------------------- runs
def fast_args(argv: list[str], data_root: str) -> list[str]:
    """``argv`` (without ``insightedit``) and the tiny settings for its subcommand."""
    data = ["--data.init_args.synthetic={num_images: 16, size: 32, seed: 0}", f"--data.init_args.root={data_root}"]
    extra = {"fit": FAST_FIT + data, "test": FAST_TEST + data, "edit": FAST_EDIT}.get(argv[1], [])
    return argv[1:] + extra


@pytest.fixture
def lightning_info(monkeypatch, caplog):
    """Lightning's console lines (``rank_zero_info``) in ``caplog``, whatever ran before."""
    lightning_log = logging.getLogger("lightning.pytorch")
    monkeypatch.setattr(lightning_log, "propagate", True)
    monkeypatch.setattr(lightning_log, "level", logging.INFO)
    caplog.set_level(logging.INFO)
    return caplog


def run(argv: list[str], data_root: str, capsys) -> tuple[int, str]:
    """Run one README command in process; return its exit code and its stderr."""
    import wandb

    code = main(fast_args(argv, data_root))
    if wandb.run is not None:  # one W&B run per command, as in separate processes
        wandb.finish()
    return code, capsys.readouterr().err


def enter_checkout_like(tmp_path: Path, monkeypatch) -> None:
    """Work in ``tmp_path`` as in a fresh clone: the README's relative config paths resolve there."""
    (tmp_path / "lightning_configs").symlink_to(REPO / "lightning_configs")
    monkeypatch.chdir(tmp_path)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_fit_made(folder: Path) -> None:
    """``last.ckpt``, a W&B run and a ``config.yaml`` recording this folder, and no ``last-v1.ckpt``."""
    assert (folder / "last.ckpt").is_file(), sorted(p.name for p in folder.iterdir())
    assert list((folder / "wandb").glob("offline-run-*")), "the W&B run is not in the run folder"
    trainer = yaml.safe_load((folder / "config.yaml").read_text())["trainer"]
    assert os.path.normpath(trainer["default_root_dir"]) == str(folder.relative_to(Path.cwd()))
    assert os.path.normpath(trainer["logger"]["init_args"]["save_dir"]) == str(folder.relative_to(Path.cwd()))
    dirpaths = [c["init_args"]["dirpath"] for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert [os.path.normpath(d) for d in dirpaths] == [str(folder.relative_to(Path.cwd()))]


def test_the_main_job_into_a_folder_holding_a_run_is_refused_and_overwrite_starts_over(tmp_path, monkeypatch,
                                                                                       capsys):
    enter_checkout_like(tmp_path, monkeypatch)
    data_root = walk(readme_commands())["data_root"][0]
    folder = tmp_path / run_folder(MAIN_JOB)
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"the previous run's weights")
    (folder / "config.yaml").write_text("the previous run's config")
    with monkeypatch.context() as patch:
        patch.setattr(InsightEditCLI, "instantiate_classes", lambda self: pytest.fail("the model was built"))
        code, err = run(MAIN_JOB, data_root, capsys)
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {run_folder(MAIN_JOB)} already holds a run (config.yaml, last.ckpt): resume it with --ckpt_path "
        "last, start over with --overwrite (deletes its checkpoints and config.yaml), or train in another folder "
        "with --trainer.default_root_dir=DIR"
    ]
    assert (folder / "last.ckpt").read_bytes() == b"the previous run's weights"
    assert (folder / "config.yaml").read_text() == "the previous run's config"
    code, err = run([*MAIN_JOB, "--overwrite", "--trainer.logger=false"], data_root, capsys)  # no W&B: faster
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt"]  # no last-v1.ckpt
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 1
    assert yaml.safe_load((folder / "config.yaml").read_text())["overwrite"] is True


def test_default_root_dir_moves_checkpoints_and_the_wandb_run_and_config_records_it(tmp_path, monkeypatch, capsys):
    enter_checkout_like(tmp_path, monkeypatch)
    assert main([*MAIN_JOB[1:], "--trainer.default_root_dir=elsewhere/run", "--print_config"]) == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["default_root_dir"] == "elsewhere/run"
    assert trainer["logger"]["init_args"]["save_dir"] == "elsewhere/run"
    assert [c["init_args"]["dirpath"] for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")] == [
        "elsewhere/run"
    ]


@pytest.mark.slow
def test_the_readme_walk_runs_and_each_step_uses_the_previous_steps_output(tmp_path, monkeypatch, capsys,
                                                                           lightning_info):
    enter_checkout_like(tmp_path, monkeypatch)
    steps = walk(readme_commands())
    data_root = steps["data_root"][0]
    for name in ("main job", "stage 1", "stage 2", "stage 3"):
        argv = steps[name]
        lightning_info.clear()
        code, err = run(argv, data_root, capsys)
        assert code == 0, f"{name}: {err[-3000:]}"
        assert_fit_made(tmp_path / run_folder(argv))
        if name == "main job":
            main_job = {p.name: digest(p) for p in (tmp_path / run_folder(argv)).iterdir() if p.is_file()}
        said = "\n".join(lightning_info.messages)
        for setting in ("init_from", "generation.pretrained"):
            loaded = option(argv, f"--model.init_args.{setting}")
            if loaded:
                line = rf"^{re.escape(setting)}: loaded \d+ tensors from {re.escape(loaded)}"
                assert re.search(line, said, re.M), said
    assert not list(tmp_path.rglob("last-v*.ckpt"))
    code, err = run(steps["test"], data_root, capsys)
    assert code == 0, err[-3000:]
    scored = tmp_path / run_folder(steps["test"])
    assert (scored / "test_report.json").is_file() and (scored / "config-test.yaml").is_file()
    code, err = run(steps["export"], data_root, capsys)
    assert code == 0, err[-3000:]
    copy = steps["cp"]
    shutil.copy(copy[1], copy[2])
    code, err = run(steps["edit"], data_root, capsys)
    assert code == 0, err[-3000:]
    assert (tmp_path / option(steps["edit"], "--out")).is_file()
    after = {p.name: digest(p) for p in (tmp_path / run_folder(steps["main job"])).iterdir() if p.is_file()}
    assert after == main_job, "the chain or its test changed the main job's folder"
