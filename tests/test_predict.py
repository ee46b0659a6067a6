"""``insightedit predict``: <out>/<id>.png at source size for any member, per-id noise, resume, sharding, evaluate.

Tiny twins at 32 px, 2 sampling steps, a handful of records. Every written edit is checked against the same
edit made directly through the Editor interface (``editor.edit`` with the record's seed), pixel for pixel.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from insightedit.cli import main
from insightedit.data.datamodule import AdvancedEditDataModule
from insightedit.data.images import clip_preprocess
from insightedit.data.manifest import read_predict_manifest
from insightedit.data.synthetic import SynthConfig, ensure_synthetic
from insightedit.errors import UserError
from insightedit.foundation_paths import FOUNDATION_OPTIONS
from insightedit.models.zoo import MEMBERS
from insightedit.systems.editor_system import EditorSystem
from insightedit.systems.prediction import PredictionRun, PredictSettings, merge_journals, record_seed

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "lightning_configs" / "tiny"
STEPS = 2
# the images a manifest names: two squares at the twin's 32 px, and three other sizes and aspects
SIZES = {"sq/a": (32, 32), "sq/b": (32, 32), "wide": (40, 24), "tall": (24, 48), "odd": (33, 31)}


def tiny_config(member: str) -> dict:
    """The member's tiny yaml (InsightEdit's is tiny/stage3.yaml), from scratch: no foundation weights.

    What is tested is how predict batches, seeds, writes and resumes: a freshly built twin keeps a redone
    edit byte-identical whatever the batch; with the foundations' weights a pixel moved by one level.
    """
    path = TINY / ("stage3.yaml" if member == "insightedit" else f"{member}.yaml")
    if not path.is_file():
        pytest.skip(f"no tiny config for {member} ({path.name})")
    config = yaml.safe_load(path.read_text())
    for section, key in FOUNDATION_OPTIONS:
        (config["model"]["init_args"].get(section) or {}).pop(key, None)
    return config


def build_system(member: str) -> EditorSystem:
    torch.manual_seed(0)
    return EditorSystem(**tiny_config(member)["model"]["init_args"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of random images of several sizes and a JSONL manifest naming them (instructions of several lengths)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lines = []
    for index, (record_id, (width, height)) in enumerate(SIZES.items()):
        name = record_id.replace("/", "_") + ".png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
        instruction = "remove the red circle" + " on the left" * index
        lines.append(json.dumps({"id": record_id, "image": name, "instruction": instruction}))
    (folder / "edits.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Two synthetic scenes (a few records each); with val_fraction 0.5 one scene is the val split."""
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "data", SynthConfig(num_images=2, size=32))


@pytest.fixture(scope="module")
def insightedit_system() -> EditorSystem:
    return build_system("insightedit")


def predict(
    system: EditorSystem, out: Path, batch_size: int, capsys=None, **data
) -> tuple[AdvancedEditDataModule, str]:
    """Run Lightning's predict with ``system`` over ``data``; return the data module and what it printed."""
    system.prediction = PredictSettings(out_dir=str(out), num_inference_steps=STEPS)
    config = tiny_config(system.hparams["member"])["data"]["init_args"]
    sizes = {key: config[key] for key in ("resolution", "mllm_size", "clip_size")}
    # the config's synthetic set is neither read nor generated when a manifest names the images
    unused = {"root": str(out.parent / "no-data"), "synthetic": {"num_images": 4, "size": 32, "seed": 0}}
    datamodule = AdvancedEditDataModule(**{**unused, **sizes, **data}, batch_size=batch_size)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.predict(system, datamodule=datamodule, return_predictions=False)
    printed = capsys.readouterr().out if capsys is not None else ""
    return datamodule, printed


def reference_edit(
    system: EditorSystem, image: Path, instruction: str, record_id: str, seed: int | None = None
) -> np.ndarray:
    """The edit made directly through the Editor interface, with the record's seed, as 8-bit pixels."""
    system.eval()  # as predict runs it (Lightning puts the module back in training mode afterwards)
    picture = Image.open(image).convert("RGB")
    source = torch.from_numpy(np.asarray(picture, dtype=np.float32).transpose(2, 0, 1).copy())[None] / 255 * 2 - 1
    editor = system.editor
    view = clip_preprocess(editor.mllm_image_size())(picture)[None] if editor.needs_mllm_view() else None
    generator = torch.Generator().manual_seed(record_seed(record_id, 0) if seed is None else seed)
    edited = editor.edit(
        source,
        view,
        [instruction],
        num_inference_steps=STEPS,
        text_guidance=7.5,
        image_guidance=1.5,
        generator=[generator],
    )
    unit = ((edited[0] + 1) / 2).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_same_edit(a: np.ndarray, b: np.ndarray) -> None:
    """Equal but for float rounding: the MLLM's batched kernels (padded instructions) differ by ~1e-7, which
    moves an 8-bit value across a rounding boundary now and then (measured: 1 value of 3072 in a 32 px edit)."""
    assert a.shape == b.shape
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() <= 0.01, (difference.max(), (difference > 0).sum())


# ------------------------------------------------------------------------------------------- manifest
@pytest.mark.parametrize(
    ("name", "text", "line", "says"),
    [
        ("m.jsonl", '{"id": "a", "image": "a.png", "instruction": "x"}\n{"id": "b", "image": "a.png"\n', 2, "not JSON"),
        ("m.jsonl", '\n{"id": "a", "image": "a.png"}\n', 2, "field 'instruction' is missing"),
        ("m.jsonl", '{"id": "a", "image": "a.png", "instruction": "  "}\n', 1, "field 'instruction' is empty"),
        ("m.jsonl", '{"id": 3, "image": "a.png", "instruction": "x"}\n', 1, "field 'id' is not a string"),
        ("m.jsonl", "[1, 2]\n", 1, "not a JSON object"),
        ("m.jsonl", '{"id": "../up", "image": "a.png", "instruction": "x"}\n', 1, "'..' path segment"),
        (
            "m.jsonl",
            '{"id": "a", "image": "a.png", "instruction": "x"}\n{"id": "a", "image": "a.png", "instruction": "y"}\n',
            2,
            "repeats line 1",
        ),
        ("m.jsonl", '{"id": "a", "image": "gone.png", "instruction": "x"}\n', 1, "gone.png not found"),
        ("m.csv", "id,image\na,a.png\n", 1, "lacks the column(s) instruction"),
        ("m.csv", 'id,image,instruction\na,a.png,"make it\nblue"\nb,a.png,\n', 4, "field 'instruction' is empty"),
        ("m.csv", "id,image,instruction\na,a.png,x,extra\n", 2, "more fields"),
    ],
)
def test_a_bad_manifest_line_is_one_error_naming_file_and_line(tmp_path, name, text, line, says):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / name
    manifest.write_text(text)
    with pytest.raises(UserError) as caught:
        read_predict_manifest(manifest)
    message = str(caught.value)
    assert message.startswith(f"{manifest}:{line}: ") and says in message and "\n" not in message


def test_jsonl_and_csv_manifests_name_the_same_edits(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "b.png")
    (tmp_path / "m.jsonl").write_text(
        '{"id": "x/1", "image": "a.png", "instruction": "make it, blue", "note": 1}\n\n'
        '{"id": "y", "image": "sub/b.png", "instruction": "add a cat"}\n'
    )
    (tmp_path / "m.csv").write_text('note,instruction,id,image\n1,"make it, blue",x/1,a.png\n,add a cat,y,sub/b.png\n')
    from_jsonl, from_csv = read_predict_manifest(tmp_path / "m.jsonl"), read_predict_manifest(tmp_path / "m.csv")
    assert from_jsonl == from_csv
    assert [(r.id, r.image, r.instruction) for r in from_csv] == [
        ("x/1", tmp_path / "a.png", "make it, blue"),
        ("y", tmp_path / "sub" / "b.png", "add a cat"),
    ]
    with pytest.raises(UserError, match=r"name it \.jsonl"):
        read_predict_manifest(tmp_path / "a.png")


# ------------------------------------------------------------------------- outputs, seeds, resume
def test_predict_writes_source_sized_edits_independent_of_batching_and_resumes(
    insightedit_system, images, tmp_path, capsys
):
    system, manifest = insightedit_system, str(images / "edits.jsonl")
    predict(system, tmp_path / "one", 1, predict_manifest=manifest)
    _, printed = predict(system, tmp_path / "two", 2, capsys, predict_manifest=manifest)
    assert f"wrote {len(SIZES)} edits" in printed and "0 skipped" in printed
    for record_id, (width, height) in SIZES.items():
        one, two = pixels(tmp_path / "one" / f"{record_id}.png"), pixels(tmp_path / "two" / f"{record_id}.png")
        assert one.shape == (height, width, 3)
        assert_same_edit(one, two)  # per-id noise: batches of 1 or 2 (grouped by working size) alike
    for record_id in ("sq/a", "sq/b"):  # at the twin's own size the file is exactly the editor's edit
        source = images / (record_id.replace("/", "_") + ".png")
        instruction = next(r.instruction for r in read_predict_manifest(manifest) if r.id == record_id)
        expected = reference_edit(system, source, instruction, record_id)
        assert np.array_equal(pixels(tmp_path / "one" / f"{record_id}.png"), expected)
        other_noise = reference_edit(system, source, instruction, record_id, seed=record_seed(record_id, 1))
        assert np.abs(other_noise.astype(int) - expected).mean() > 2  # the seed matters: it is not the batch's
        assert np.abs(expected.astype(int) - pixels(source)).mean() > 2  # the edit did change the image
    rows = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == sorted(SIZES)
    assert all(row["seed"] == record_seed(row["id"], 0) and row["num_inference_steps"] == STEPS for row in rows)
    assert {(row["width"], row["height"]) for row in rows} == set(SIZES.values())
    assert not list((tmp_path / "two").glob(".predictions.rank*"))  # journals merged and removed
    assert not (tmp_path / "no-data").exists()

    # resume: two outputs gone; only those two are loaded and edited, the others are not touched
    out = tmp_path / "two"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*.png")}
    for record_id in ("sq/b", "tall"):
        (out / f"{record_id}.png").unlink()
    datamodule, printed = predict(system, out, 2, capsys, predict_manifest=manifest)
    assert f"wrote 2 edits to {out}, {len(SIZES) - 2} skipped" in printed
    assert [record.id for record in datamodule.predict_dataset.records] == ["sq/b", "tall"]  # filtered before batching
    for path, (data, mtime) in before.items():
        assert path.read_bytes() == data  # redone ones byte-identical, kept ones untouched
        if path.stem not in ("b", "tall"):
            assert path.stat().st_mtime_ns == mtime
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(SIZES)


def test_ranks_share_the_remaining_records_without_repeats(synthetic, tmp_path):
    """Lightning's predict sampler over the filtered data: every remaining record on exactly one rank."""
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.trainer.states import RunningStage

    datamodule = AdvancedEditDataModule(
        root=str(synthetic),
        resolution=32,
        mllm_size=32,
        clip_size=32,
        val_fraction=0.0,
        predict_split="all",
        batch_size=2,
    )
    datamodule.setup("predict")
    every = [record.id for record in datamodule.predict_dataset.records]
    done = set(every[::4])
    assert datamodule.skip_predictions(done) == len(done)
    loader = datamodule.predict_dataloader()
    shards = []
    for rank in range(3):
        sampler = _get_distributed_sampler(
            loader, shuffle=False, overfit_batches=0, mode=RunningStage.PREDICTING, num_replicas=3, rank=rank
        )
        shards.append([loader.dataset.records[index].id for index in sampler])
    remaining = [record_id for record_id in every if record_id not in done]
    assert sorted(sum(shards, [])) == sorted(remaining)  # each once: no padding duplicates, none lost
    assert max(map(len, shards)) - min(map(len, shards)) <= 1

    # two ranks writing into one folder: their journals merge into one predictions.jsonl of existing images
    for rank, record_id in enumerate(("r0", "r1")):
        run = PredictionRun(PredictSettings(), tmp_path, rank)
        batch = {"image_path": ["x.png"], "instruction": ["do"]}
        run._write(record_id, Image.new("RGB", (4, 4)), batch, 0, 7, (4, 4))
    (tmp_path / ".predictions.rank1.jsonl").open("a").write('{"id": "torn')  # a crash mid-line
    assert merge_journals(tmp_path) == 2
    assert [json.loads(line)["id"] for line in (tmp_path / "predictions.jsonl").read_text().splitlines()] == [
        "r0",
        "r1",
    ]


def test_sharded_strategies_are_refused_for_predict(insightedit_system, tmp_path):
    from insightedit.training.sharding import FSDP2Strategy

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(), logger=False)
    insightedit_system.trainer = trainer
    insightedit_system.prediction = PredictSettings(out_dir=str(tmp_path / "out"))
    try:
        with pytest.raises(UserError, match="use --trainer.strategy=ddp"):
            insightedit_system.setup("predict")
    finally:
        insightedit_system.trainer = None
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- every member
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_every_member_predicts_through_the_editor_interface(member, images, tmp_path):
    system = build_system(member)
    manifest = tmp_path / "two.jsonl"
    lines = (images / "edits.jsonl").read_text().splitlines()[:2]  # sq/a and sq/b, 32 px
    manifest.write_text("\n".join(lines) + "\n")
    predict(system, tmp_path / "out", 1, predict_manifest=str(manifest), predict_images=str(images))
    for record in read_predict_manifest(manifest, images):
        expected = reference_edit(system, record.image, record.instruction, record.id)
        assert np.array_equal(pixels(tmp_path / "out" / f"{record.id}.png"), expected), (member, record.id)


# ------------------------------------------------------------------------- the command, evaluate
def test_predict_command_with_a_checkpoint_then_evaluate(insightedit_system, synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    system = insightedit_system
    checkpoint = tmp_path / "stage3.ckpt"
    kept = system.saved_names()
    state = {name: value for name, value in system.state_dict().items() if name in kept}
    torch.save(
        {
            "state_dict": state,
            "pytorch-lightning_version": L.__version__,
            "epoch": 0,
            "global_step": 0,
            "hyper_parameters": {**system.hparams, "_class_path": "insightedit.systems.editor_system.EditorSystem"},
        },
        checkpoint,
    )
    out = tmp_path / "predictions"
    data = [
        "--data.init_args.synthetic=null",
        f"--data.init_args.root={synthetic}",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.5",
    ]
    common = [
        "predict",
        "--config",
        str(TINY / "stage3.yaml"),
        *data,
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--ckpt_path",
        str(checkpoint),
    ]
    # the checkpoint's hyperparameters never hide the command line's prediction settings
    code = main(
        [
            *common,
            "--data.init_args.predict_split=val",
            f"--model.init_args.prediction={{out_dir: {out}, num_inference_steps: {STEPS}}}",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows and capsys.readouterr().out.count(f"wrote {len(rows)} edits to {out}, 0 skipped") == 1
    assert len(list(out.rglob("*.png"))) == len(rows)
    for row in rows[:2]:  # the checkpoint's weights made them: the same edit as the system that saved them
        expected = reference_edit(system, Path(row["image"]), row["instruction"], row["id"])
        assert_same_edit(pixels(out / f"{row['id']}.png"), expected)

    code = main(
        [
            "evaluate",
            "--data",
            str(synthetic),
            "--pred-dir",
            str(out),
            "--protocol",
            "advancededit",
            "--resolution",
            "64",
            "--lpips",
            "none",
            "--no-clip",
            "--out",
            str(tmp_path / "report.json"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["counts"]["scored"] == len(rows) and report["counts"]["unexpected"] == 0
    assert sorted(row["id"] for row in report["rows"]) == sorted(row["id"] for row in rows)
    assert len(report["missing"]) == report["counts"]["records"] - len(rows) > 0  # the other split's records
    assert all(np.isfinite(row["psnr"]) for row in report["rows"])


def test_predict_data_options_are_checked_in_one_line(synthetic, tmp_path):
    with pytest.raises(UserError, match="predict needs what to edit: --data.init_args.predict_split=test"):
        AdvancedEditDataModule(root=str(synthetic)).setup("predict")
    with pytest.raises(UserError, match="predict_split must be one of train, val, test, all"):
        AdvancedEditDataModule(root=str(synthetic), predict_split="tests")
    with pytest.raises(UserError, match="not both"):
        AdvancedEditDataModule(root=str(synthetic), predict_split="val", predict_manifest="m.jsonl")
    # no test split (test_fraction 0): the val split, as `insightedit test` edits
    as_test = AdvancedEditDataModule(root=str(synthetic), predict_split="test", val_fraction=0.5)
    as_test.setup("predict")
    as_val = AdvancedEditDataModule(root=str(synthetic), predict_split="val", val_fraction=0.5)
    as_val.setup("predict")
    assert as_test.predict_dataset.records == as_val.predict_dataset.records != []


# --------------------------------------------------------------------------------- real DDP, slow
@pytest.mark.slow
def test_two_process_ddp_predict_writes_each_record_once(images, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "insightedit",
        "predict",
        "--config",
        str(TINY / "stage3.yaml"),
        f"--data.init_args.predict_manifest={images / 'edits.jsonl'}",
        "--data.init_args.batch_size=1",
        f"--model.init_args.prediction={{out_dir: {out}, num_inference_steps: {STEPS}}}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # each rank wrote its share and no id twice: 5 files, 5 writes in all, both ranks at work
    shares = re.search(r"wrote (\d+) edits to .* \(ranks: (\d+) \+ (\d+)\)", result.stdout)
    assert shares is not None, result.stdout[-2000:]
    assert int(shares[1]) == int(shares[2]) + int(shares[3]) == len(SIZES) and min(int(shares[2]), int(shares[3])) > 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == sorted(SIZES) and len(list(out.rglob("*.png"))) == len(SIZES)
    assert not (tmp_path / "data").exists()  # the config's synthetic set was not generated
    L.seed_everything(0)  # as the config's seed_everything: the same random weights as the command built
    system = EditorSystem(**tiny_config("insightedit")["model"]["init_args"])
    expected = reference_edit(system, images / "sq_a.png", "remove the red circle", "sq/a")
    assert np.array_equal(pixels(out / "sq" / "a.png"), expected)
