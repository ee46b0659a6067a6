"""``insightedit data build`` with oracle backends: exact records, resume after SIGKILL, 2-rank shards, bad inputs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from insightedit.cli import main
from insightedit.data.build.config import config_from_dict, load_config
from insightedit.data.build.oracle import SCENE_SUFFIX, parse_object_name, render_photos, scene_from_dict
from insightedit.data.build.runner import shard
from insightedit.data.checking import check_dataset
from insightedit.data.datamodule import AdvancedEditDataModule
from insightedit.data.records import load_records
from insightedit.data.scenes import SceneObject
from insightedit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "lightning_configs" / "data_build"
NUM_PHOTOS = 5


def _config(tmp: Path, name: str, **changes) -> Path:
    """oracle.yaml with ``noop_every: 2`` (every 2nd object's edits fail) and dotted-key ``changes``."""
    config = yaml.safe_load((CONFIGS / "oracle.yaml").read_text())
    config["steps"]["inpaint"]["noop_every"] = 2
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _environment() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _command(config: Path, photos: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "insightedit",
        "data",
        "build",
        "--config",
        str(config),
        "--images",
        str(photos),
        "--out",
        str(out),
    ]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file of a build's output except the work folder and the summary (timings, ranks)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".build" not in p.parts and p.name != "summary.json"
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    render_photos(folder, NUM_PHOTOS, size=32, seed=0)
    return folder


@pytest.fixture(scope="module")
def built(photos, tmp_path_factory) -> tuple[Path, int, str]:
    """One uninterrupted in-process oracle build (exit code and printed summary too)."""
    tmp = tmp_path_factory.mktemp("built")
    out = tmp / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["data", "build", "--config", str(_config(tmp, "oracle")), "--images", str(photos), "--out", str(out)]
        )
    return out, code, printed.getvalue()


def _scene(photos: Path, image_id: str):
    return scene_from_dict(json.loads((photos / f"{image_id}{SCENE_SUFFIX}").read_text()))


def _exact_target(scene, record) -> np.ndarray:
    """What the renderer draws for a record's target (remove: original or without; replace: swapped or original)."""
    names = [o.name for o in scene.objects]
    if record.task_type == "add" or (record.task_type == "replace" and record.class_target in names):
        return scene.render()
    if record.task_type == "remove":
        return scene.without(names.index(record.class_origin)).render()
    index = names.index(record.class_origin)
    colour, shape = parse_object_name(record.class_target)
    old = scene.objects[index]
    return scene.swapped(index, SceneObject(shape, colour, old.x, old.y, old.radius)).render()


def test_oracle_build_gives_exact_checked_records_and_filters_failed_edits(built, photos):
    out, code, printed = built
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    assert all(s == {"done": NUM_PHOTOS, "failed": 0, "blocked": 0, "pending": 0} for s in summary["steps"].values())
    report = check_dataset(out)
    assert report.format == "manifest" and report.bad == [] and len(report.good) == summary["records"]["total"] > 0
    scenes = {f"{i:06d}": _scene(photos, f"{i:06d}") for i in range(NUM_PHOTOS)}
    # noop_every 2: every edit of object k = 2 is a no-op the judge scores 0; 4 records per object
    objects = sum(len(s.objects) for s in scenes.values())
    failed = 4 * sum(len(s.objects) >= 2 for s in scenes.values())
    assert summary["filter"]["scored"] == 4 * objects and summary["filter"]["passed"] == 4 * objects - failed
    assert summary["filter"]["pass_rate"] == round((4 * objects - failed) / (4 * objects), 4) < 1
    assert f"filter: {4 * objects - failed} of {4 * objects} scored records passed" in printed
    counts = report.task_counts()
    assert counts["remove"] == counts["add"] and counts["replace"] == 2 * counts["remove"]
    for record in report.good:
        scene = scenes[record.source_id]
        source = np.asarray(Image.open(record.source_path))
        target = np.asarray(Image.open(record.target_path))
        assert np.array_equal(target, _exact_target(scene, record)), record.id  # the exact edit
        assert np.array_equal(record.mask(), np.any(source != target, axis=-1)), record.id  # the exact mask
        assert record.reasoning_instructions and len(record.instructions) >= 2
        assert record.extra["viescore"]["passed"] and record.extra["qwen_VIE_SC"]["instruction_follow"] == 5.0
    assert np.array_equal(
        np.asarray(Image.open(out / "0_source_img" / "000000.png")), np.asarray(Image.open(photos / "000000.png"))
    )
    # the official layout holds every record (scores included); the manifest only those that passed
    assert len(load_records(out / "5_quality_evaluation")) == 4 * objects
    data = AdvancedEditDataModule(
        root=str(out), resolution=32, clip_size=32, mllm_size=32, batch_size=2, val_fraction=0.2
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["source"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 1, 32, 32)


def test_the_output_feeds_data_optimize(built, tmp_path, capsys):
    out, _, _ = built
    shards = tmp_path / "shards"
    assert main(["data", "optimize", str(out), "--out", str(shards), "--val-fraction", "0.2", "--store-size", "0"]) == 0
    written = json.loads(capsys.readouterr().out.split("wrote ", 1)[1].split(" items")[0])
    assert sum(written.values()) == json.loads((out / "summary.json").read_text())["records"]["total"]
    assert (shards / "train" / "index.json").is_file()


def test_a_rerun_does_nothing_and_changes_nothing(built, photos, tmp_path, capsys):
    out, _, _ = built
    before = _tree(out)
    assert (
        main(["data", "build", "--config", str(_config(tmp_path, "again")), "--images", str(photos), "--out", str(out)])
        == 0
    )
    assert "this run: already done 5" in capsys.readouterr().out
    assert _tree(out) == before


def test_sigkill_midway_then_rerun_equals_an_uninterrupted_build(built, photos, tmp_path):
    out = tmp_path / "out"
    slow = _config(tmp_path, "slow", **{"steps.inpaint.delay_s": 0.15})
    process = subprocess.Popen(
        _command(slow, photos, out), env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    done, pending = out / ".build" / "done" / "3_inpaint", out / ".build" / "pending" / "3_inpaint"

    def midway() -> bool:  # two images through step 3 and a third one half-written (some targets, no marker)
        if not done.is_dir() or len(list(done.glob("*.json"))) < 2:
            return False
        for plan in pending.glob("*.json") if pending.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                if any((out / name).is_file() for name in json.loads(plan.read_text())["files"]):
                    return True
        return False

    deadline = time.monotonic() + 120
    while not midway() and process.poll() is None:
        assert time.monotonic() < deadline, "step 3 never got midway"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert 2 <= len(list(done.glob("*.json"))) < NUM_PHOTOS and not (out / "manifest.jsonl").exists()
    assert main(["data", "build", "--config", str(slow), "--images", str(photos), "--out", str(out)]) == 0
    reference, resumed = _tree(built[0]), _tree(out)
    assert resumed.keys() == reference.keys()  # nothing missing, nothing extra (no duplicate or stale files)
    assert all(resumed[name] == reference[name] for name in reference)  # JSON and image bytes equal
    assert not list(out.rglob("*.tmp"))
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len({json.loads(line)["id"] for line in lines}) == len(lines)


def test_two_ranks_split_the_images_with_no_overlap_and_no_gap(built, photos, tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path, "ddp", **{"trainer.devices": 2, "trainer.strategy": "ddp"})
    result = subprocess.run(
        _command(config, photos, out), env=_environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("built ") == 1  # only rank 0 reports
    ids = sorted(f"{i:06d}" for i in range(NUM_PHOTOS))
    handled = {
        rank: [json.loads(line) for line in (out / ".build" / "ranks" / f"rank{rank}.jsonl").open()] for rank in (0, 1)
    }
    for step in range(1, 6):
        mine = {rank: [e["image_id"] for e in entries if e["step"] == step] for rank, entries in handled.items()}
        assert mine[0] == shard(ids, 0, 2) and mine[1] == shard(ids, 1, 2)
        assert not set(mine[0]) & set(mine[1]) and set(mine[0]) | set(mine[1]) == set(ids)
        assert all(e["world_size"] == 2 for entries in handled.values() for e in entries)
    assert _tree(out) == _tree(built[0])  # the same records as one process


def test_shard_is_a_partition():
    ids = [f"{i:03d}" for i in range(11)]
    for world in (1, 2, 3, 4, 16):
        parts = [shard(list(reversed(ids)), rank, world) for rank in range(world)]
        assert sorted(sum(parts, [])) == ids and sum(len(p) for p in parts) == len(ids)


def test_a_corrupt_image_is_recorded_and_can_be_retried_alone(photos, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for image_id in ("000000", "000001"):
        for suffix in (".png", SCENE_SUFFIX):
            shutil.copy(photos / f"{image_id}{suffix}", images / f"{image_id}{suffix}")
    (images / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    shutil.copy(photos / f"000002{SCENE_SUFFIX}", images / f"000002{SCENE_SUFFIX}")
    config, out = _config(tmp_path, "oracle"), tmp_path / "out"
    argv = ["data", "build", "--config", str(config), "--images", str(images), "--out", str(out)]
    assert main(argv) == 1  # finished, with a recorded failure
    printed = capsys.readouterr().out
    failure = json.loads((out / "failures" / "1_caption" / "000002.json").read_text())
    assert "not an image or corrupt" in failure["reason"] and failure["attempts"] == 1
    assert "1_caption 000002: not an image or corrupt" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["1_caption"] == {"done": 2, "failed": 1, "blocked": 0, "pending": 0}
    assert summary["steps"]["5_filter"] == {"done": 2, "failed": 0, "blocked": 1, "pending": 0}
    assert check_dataset(out).bad == [] and {r.source_id for r in check_dataset(out).good} == {"000000", "000001"}
    assert main(argv) == 1 and "failed before 1" in capsys.readouterr().out  # a plain rerun leaves it alone
    shutil.copy(photos / "000002.png", images / "000002.png")  # fixed
    assert main([*argv, "--retry-failed"]) == 0
    assert "this run: already done 2, done 1" in capsys.readouterr().out
    assert not (out / "failures" / "1_caption" / "000002.json").exists()
    assert {r.source_id for r in check_dataset(out).good} == {"000000", "000001", "000002"}


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: ["--images", str(tmp / "nowhere")], "error: images folder"),
        (lambda tmp: ["--config", str(tmp / "missing.yaml")], "error: config"),
        (lambda tmp: ["--config", _write(tmp, "steps: [unclosed")], "not valid yaml"),
        (lambda tmp: ["--config", _write(tmp, "steps:\n  caption: {colour: red}\n")], "Key 'colour' not in"),
        (lambda tmp: ["--config", _write(tmp, "steps:\n  filter: {threshold: high}\n")], "steps.filter.threshold"),
        (
            lambda tmp: ["--config", _write(tmp, "steps:\n  segment: {backend: grounded_sam, grounding_dino: /x}\n")],
            "steps.segment.grounding_dino: folder /x does not exist",
        ),
        (lambda tmp: ["--config", _write(tmp, "steps:\n  caption: {backend: openai}\n")], "needs base_url and model"),
        (lambda tmp: ["--steps", "2-7"], "steps are numbered 1 to 5"),
        (lambda tmp: ["--trainer"], "unknown option --trainer"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2(make, expected, photos, tmp_path, capsys):
    args = {"--config": str(CONFIGS / "oracle.yaml"), "--images": str(photos), "--out": str(tmp_path / "out")}
    extra = make(tmp_path)
    if extra[0] in args and len(extra) == 2:
        args[extra[0]] = extra[1]
        extra = []
    code = main(["data", "build", *[x for pair in args.items() for x in pair], *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists()  # nothing started


def _write(tmp: Path, text: str) -> str:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_configs_load(tmp_path):
    oracle = load_config(CONFIGS / "oracle.yaml")
    assert oracle.steps.segment.backend == "oracle" and oracle.trainer.accelerator == "cpu"
    raw = yaml.safe_load((CONFIGS / "vllm_qwen.yaml").read_text())
    for section, key in (("segment", "grounding_dino"), ("segment", "sam"), ("inpaint", "model")):
        (tmp_path / key).mkdir()
        raw["steps"][section][key] = str(tmp_path / key)
    real = config_from_dict(raw, "vllm_qwen.yaml")
    for spec in (real.steps.caption, real.steps.rewrite, real.steps.filter, real.steps.inpaint.chat):
        assert spec.backend == "openai" and spec.base_url == "http://localhost:8000/v1" and spec.concurrency == 16
    assert real.steps.caption.max_objects == 8 and real.steps.filter.threshold == 0.6
    assert real.trainer.strategy == "ddp" and real.steps.segment.dtype == "float16"
    with pytest.raises(UserError, match="grounding_dino: folder /models/grounding-dino-base does not exist"):
        load_config(CONFIGS / "vllm_qwen.yaml")  # the placeholder folders are not on this machine


def test_synth_photos_writes_images_with_scene_sidecars(tmp_path, capsys):
    assert main(["data", "synth", "--photos", "--out", str(tmp_path / "p"), "--num-images", "3", "--size", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir())[:2] == ["000000.png", f"000000{SCENE_SUFFIX}"]
    assert main(["data", "synth", "--photos", "--out", str(tmp_path / "p"), "--num-images", "3"]) == 2
    assert "is not empty" in capsys.readouterr().err
