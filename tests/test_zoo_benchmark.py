"""benchmarks/zoo.py's own arithmetic and layout (no training): in-mask PSNR, skipped members, table, grid."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from insightedit.evaluation.metrics import PSNR_CAP_DB

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo() -> Any:
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("zoo_benchmark", ROOT / "benchmarks" / "zoo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def test_psnr_in_mask_reads_only_the_mask(zoo: Any) -> None:
    target = torch.zeros(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    edited = target.clone()
    edited[0, :, :4] += 0.2  # 0.1 in [0, 1] inside the mask: MSE 0.01, 20 dB
    edited[:, :, 4:] = 1.0  # outside the mask: must not count
    values = zoo.psnr_in_mask(edited, target, mask)
    assert values[0] == pytest.approx(20.0, abs=1e-4)
    assert values[1] == PSNR_CAP_DB  # identical inside the mask: the cap, not infinity


def test_members_whose_module_is_absent_are_skipped_with_a_note(zoo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name.endswith(".mgie") else real(name, *args)

    monkeypatch.setattr(zoo.importlib.util, "find_spec", find_spec)
    chosen, notes = zoo.available_members(["insightedit", "mgie", "instruct_pix2pix"])
    assert chosen == ["instruct_pix2pix", "insightedit"]  # the paper's order
    assert notes == {"mgie": "skipped: insightedit/models/members/mgie.py is absent"}


def summary(psnr: float | None, inside: float) -> dict[str, Any]:
    return {"n": 1, "psnr": psnr, "ssim": 0.5, "lpips": None, "psnr_target": 12.0, "psnr_in_mask": inside}


def test_table_has_a_row_per_member_and_marks_the_cap_and_missing_values(zoo: Any) -> None:
    groups = {"all": summary(PSNR_CAP_DB, 7.0), "remove": summary(PSNR_CAP_DB, 7.04)}
    scores = {"identity": {p: groups for p in zoo.PHRASINGS}, "InsightEdit": {p: groups for p in zoo.PHRASINGS}}
    text = zoo.markdown(scores, "ST-LPIPS")
    rows = [line for line in text.splitlines() if line.startswith("| identity") or line.startswith("| InsightEdit")]
    assert len(rows) == 4  # the paper-shaped table and the per-task table
    assert rows[0] == "| identity | ∞ | 0.500 | n/a | 12.00 | 7.00 | ∞ | 0.500 | n/a | 12.00 | 7.00 |"
    assert rows[2] == "| identity | 7.0 / ∞ | – | – | 7.0 / ∞ | – | – |"  # add and replace absent


def test_grid_has_a_row_per_example_and_a_column_per_member(zoo: Any, tmp_path: Path) -> None:
    tasks = ["remove", "add", "replace", "remove"]
    batch = {
        "source": torch.zeros(4, 3, 8, 8),
        "target": torch.full((4, 3, 8, 8), 0.5),
        "task_type": tasks,
        "instruction": [f"edit {i}" for i in range(4)],
    }
    edits = {"A": [torch.full((4, 3, 8, 8), -1.0)], "B": [torch.zeros(4, 3, 8, 8)]}
    path = tmp_path / "grid.png"
    zoo.picture([batch], edits, path, per_task=1, scale=2)
    side, pad, head, text = 16, 4, 28, 220
    with Image.open(path) as image:
        assert image.size == (text + 4 * (side + pad) + pad, head + 3 * (side + pad) + pad)
        x_target = text + pad + 3 * (side + pad)
        assert image.getpixel((x_target + 1, head + 1)) == (191, 191, 191)  # target column: 0.5 → 191
        assert image.getpixel((text + pad + side + pad + 1, head + 1)) == (0, 0, 0)  # member A: -1 → black
