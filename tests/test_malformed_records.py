"""Malformed records: reported one line each by ``data check``, skipped and counted by the data module and
``evaluate``'s reader, never a traceback; over-long instructions are cut at load and in the MLLM prompt."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from insightedit.commands.data import main as data_main
from insightedit.data.checking import check_dataset, reason_kind
from insightedit.data.datamodule import AdvancedEditDataModule
from insightedit.data.dataset import EditDataset
from insightedit.data.records import MAX_INSTRUCTION_CHARS, BadRecord, load_records, write_manifest
from insightedit.data.samples import SampleConfig
from insightedit.data.synthetic import SynthConfig, synthesize
from insightedit.errors import UserError

SMALL = SampleConfig(resolution=32, clip_size=16, mllm_size=16)
LONG = ("remove the red circle " * 5000)[:102_400]  # 100 kB


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Three images, one object each: 12 clean records in the official layout."""
    root = tmp_path_factory.mktemp("clean") / "data"
    synthesize(root, SynthConfig(num_images=3, size=32, seed=3, max_objects=1))
    return root


def _battery(template: dict) -> list[tuple[bytes, str | None]]:
    """Manifest lines (bytes) and the reason each is bad (``None``: usable)."""

    def line(**changes) -> bytes:
        data = {**template, **changes}
        for key in [k for k, v in changes.items() if v is _DROP]:
            del data[key]
        return json.dumps(data).encode()

    return [
        (line(id="x/string"), None),  # line 1: the first of a duplicated id, usable
        (line(id="x/string", instructions="remove the red circle"),
         "invalid instruction: 'instructions' is a string, not a list of strings"),
        (line(id="x/mixed", instructions=["remove the red circle", 5]),
         "invalid instruction: instructions[1] is a JSON number, not a string"),
        (line(id="x/empty", instructions=[""]), "empty instruction (instructions[0] is blank)"),
        (line(id="x/blank", reasoning_instructions=["   "]), "empty instruction (reasoning_instructions[0] is blank)"),
        (line(id="x/none", instructions=[], reasoning_instructions=[]), "empty instruction"),
        (line(id="x/long", instructions=[LONG]), None),
        (line(id="x/string"), "duplicate id (first at line 1)"),
        (line(id="x/bbox-str", bbox=["a", 1, 2, 3]), "invalid bbox: bbox[0] is a JSON string, not a number"),
        (line(id="x/bbox-null", bbox=[0, None, 2, 3]), "invalid bbox: bbox[1] is a JSON null, not a number"),
        (line(id="x/bbox-nan", bbox=[0, 1, float("nan"), 3]), "invalid bbox: bbox[2] is nan, not a finite number"),
        (line(id="x/bbox-3", bbox=[1, 2, 3]), "invalid bbox: 3 values, not [x, y, w, h]"),
        (line(id="x/bbox-neg", bbox=[1, 2, -3, 4]), "invalid bbox: negative size -3 x 4"),
        (b'{"id": "caf\xe9", "task_type": "remove"}', "not UTF-8 text (byte 0xe9 at column 12)"),
        (b"this is not JSON", "malformed JSON (Expecting value: line 1 column 1 (char 0))"),
        (b'["remove", "the red circle"]', "not a record object (a JSON array)"),
        (line(id="x/no-source", source_path=_DROP), "missing required field 'source_path'"),
        (line(id="x/task", task_type="paint"), "unknown task_type 'paint'"),
    ]  # fmt: skip


_DROP = object()


@pytest.fixture(scope="module")
def battery(synthetic, tmp_path_factory):
    """A manifest of the 12 clean records followed by the malformed battery; returns (path, bad, good ids)."""
    records = list(load_records(synthetic))
    path = write_manifest(records, synthetic / "manifest.jsonl")
    template = json.loads(path.read_text().splitlines()[0])
    lines = _battery(template)
    with path.open("ab") as handle:
        for data, _ in lines:
            handle.write(data + b"\n")
    first = len(records) + 1
    bad = []
    for number, (data, reason) in enumerate(lines, start=first):
        if reason is None:
            continue
        where = f"{path}:{number}"
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):  # a JSON object with an id: the id is named
            where += f" ({parsed['id']})"
        bad.append(BadRecord(where, reason.replace("line 1)", f"line {first})")))
    good = [r.id for r in records] + ["x/string", "x/long"]
    return path, bad, good


def test_manifest_battery_is_reported_one_line_each(battery):
    path, bad, good = battery
    report = check_dataset(path)
    assert report.bad == bad
    assert [r.id for r in report.good] == good
    assert [str(w) for w in report.warnings] == [
        f"{path}:{len(good) + 5} (x/long): instruction truncated to 1000 characters (was 102400)"
    ]
    long = next(r for r in report.good if r.id == "x/long")
    assert long.instructions == [LONG[:MAX_INSTRUCTION_CHARS].rstrip()]
    assert report.bad_reasons() == {
        "invalid instruction": 2, "empty instruction": 3, "duplicate id": 1, "invalid bbox": 5, "not UTF-8": 1,
        "malformed": 1, "not a record object": 1, "missing required field": 1, "unknown task_type": 1,
    }  # fmt: skip


def test_data_check_lists_every_bad_record_and_exits_1(battery, capsys):
    path, bad, good = battery
    assert data_main(["check", str(path), "--max-listed", "100"]) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert f"records: {len(good) + len(bad)} ({len(good)} usable, {len(bad)} bad)" in lines
    assert "warnings: 1 records changed at load" in lines
    for item in bad:
        assert f"  {item}" in lines
    assert sum(line.startswith(f"  {path}:") for line in lines) == len(bad) + 1  # + the warning


def test_official_layout_battery(synthetic, tmp_path):
    root = tmp_path / "official"
    synthesize(root, SynthConfig(num_images=3, size=32, seed=3, max_objects=1))
    file = root / "4_instruction_recaption" / "remove_add" / "000000.json"
    raw = json.loads(file.read_text())
    assert sorted(raw) == ["0", "1"]
    raw["0"]["instruction"] = "remove the red circle"  # the release's one-string form: one instruction
    raw["1"]["instruction"] = ["add it", 5]
    other = root / "4_instruction_recaption" / "replace" / "000000.json"
    replace = json.loads(other.read_text())
    replace["0"]["instruction"] = ["   "]
    replace["1"]["bbox"] = [None, 1, 2, 3]
    replace["2"] = ["not", "a", "record"]
    file.write_text(json.dumps(raw))
    other.write_text(json.dumps(replace))
    third = root / "4_instruction_recaption" / "remove_add" / "000001.json"
    extra = json.loads(third.read_text())
    extra["0"]["reasoning_instruction1"] = LONG
    del extra["1"]["task_type"]
    third.write_text(json.dumps(extra))

    report = check_dataset(root)
    assert [str(b) for b in report.bad] == [
        f"{other} [2]: not a record object (a JSON array)",
        f"000000/remove_add/1: invalid instruction: instruction[1] is a JSON number, not a string (in {file})",
        f"000000/replace/0: empty instruction (instruction[0] is blank) (in {other})",
        f"000000/replace/1: invalid bbox: bbox[0] is a JSON null, not a number (in {other})",
        f"000001/remove_add/1: missing task_type (in {third})",
    ]
    assert [str(w) for w in report.warnings] == [
        f"000001/remove_add/0 (in {third}): instruction truncated to 1000 characters (was 102400)"
    ]
    by_id = {r.id: r for r in report.good}
    assert by_id["000000/remove_add/0"].instructions == ["remove the red circle"]
    assert by_id["000001/remove_add/0"].reasoning_instructions[0] == LONG[:MAX_INSTRUCTION_CHARS].rstrip()
    assert len(report.good) == 12 - 4


def test_non_utf8_json_file_is_one_bad_file(tmp_path, capsys):
    folder = tmp_path / "json"
    folder.mkdir()
    (folder / "000000.json").write_bytes(b'{"0": {"instruction": ["caf\xe9"], "task_type": "remove"}}')
    assert data_main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"  {folder / '000000.json'}: malformed JSON ('utf-8' codec can't decode byte 0xe9 in position 27" in out


def test_datamodule_skips_and_counts_and_keeps_max_bad_fraction(battery):
    path, bad, good = battery
    fraction = len(bad) / (len(bad) + len(good))
    kwargs = dict(root=str(path), resolution=32, clip_size=16, mllm_size=16, val_fraction=0.0, batch_size=4)
    with pytest.raises(UserError) as error:
        AdvancedEditDataModule(max_bad_fraction=fraction - 0.01, **kwargs).setup("fit")
    message = str(error.value)
    assert "\n" not in message and f"{len(bad)} of {len(bad) + len(good)} records" in message
    assert f"duplicate id x1 (e.g. {path}:" in message and "not UTF-8 x1" in message
    for check_images in (True, False):
        module = AdvancedEditDataModule(max_bad_fraction=fraction, check_images=check_images, **kwargs)
        module.setup("fit")
        dataset = module.datasets["train"]
        assert sorted(r.id for r in dataset.records) == sorted(good)
    assert module.report is None  # check_images=False still loaded only the usable records
    index = next(i for i, r in enumerate(dataset.records) if r.id == "x/long")
    sample = dataset[index]
    assert sample["record_id"] == "x/long" and sample["load_failures"] == 0
    assert sample["plain_instruction"] == LONG[:MAX_INSTRUCTION_CHARS].rstrip()
    batch = next(iter(module.train_dataloader()))
    assert batch["source"].shape == (4, 3, 32, 32)


def test_dataset_replaces_a_record_without_instructions(battery):
    path, _, _ = battery
    records = list(load_records(path))[:3]
    records[0].instructions, records[0].reasoning_instructions = [], []
    dataset = EditDataset(records, SMALL)
    sample = dataset[0]
    assert sample["record_id"] == records[1].id and sample["load_failures"] == 1
    assert dataset.failed == {0: "empty instruction"} and dataset.failures == {"empty instruction": 1}
    assert reason_kind("duplicate id (first at line 3)") == "duplicate id"


def test_evaluate_reader_skips_bad_records(battery, tmp_path):
    from insightedit.evaluation.collect import collect_advancededit

    path, bad, good = battery
    predictions = tmp_path / "pred"
    for record_id in good:
        (predictions / record_id).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(predictions / f"{record_id}.png")
    collection = collect_advancededit(path, predictions)
    assert collection.skipped == {item.where: item.reason for item in bad}
    assert sorted(sample.id for sample in collection.samples) == sorted(good)
    assert collection.n_records == len(good) + len(bad) and not collection.missing and not collection.unexpected


def test_long_instruction_prompt_is_bounded():
    """A 100 kB instruction through the MLLM prompt builder: at most max_position_embeddings tokens."""
    from insightedit.models.comprehension import build_comprehension
    from insightedit.models.comprehension.prompts import PromptEncoder

    model = build_comprehension("tiny").eval()
    encoder = model.prompts
    assert encoder is not None and encoder.max_length == 512
    short = "remove the red circle"
    unbounded = PromptEncoder(encoder.tokenizer, encoder.mm_tokens, encoder.image_token_id, encoder.num_image_tokens)
    assert unbounded.max_length == 2048  # the tiny tokenizer's model_max_length; the model has 512 positions
    batch = encoder([short, LONG])
    lengths = batch.attention_mask.sum(dim=1).tolist()
    assert lengths[0] == len(unbounded([short]).input_ids[0]) and 500 <= lengths[1] <= 512
    assert torch.equal(batch.mm_mask.sum(dim=1), torch.tensor([32, 32])) and encoder.truncated == 1
    ids = encoder.tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert len(ids) > 20_000  # what the step would have been fed without the bound
    row = encoder.bounded_row(LONG)
    assert len(row) == lengths[1] and row[-32:] == encoder.mm_token_ids
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixels, [short, LONG])
    assert out.h.shape == (2, 32, 64) and math.isfinite(out.loss_llm.item())
