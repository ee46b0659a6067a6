"""benchmarks/zoo.py and zoo_stats.py without training: in-mask PSNR, seeds' mean / spread, orderings, target, CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _benchmarks import load_benchmark
from PIL import Image

from insightedit.errors import UserError
from insightedit.evaluation.metrics import PSNR_CAP_DB

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stats() -> Any:
    """benchmarks/zoo_stats.py (pure arithmetic and text)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import zoo_stats

    return zoo_stats


@pytest.fixture(scope="module")
def zoo() -> Any:
    """The benchmark script as a module (benchmarks/ is not a package)."""
    return load_benchmark("zoo")


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


def test_held_out_pairs_take_an_equal_share_of_each_task_in_the_drawn_order(zoo: Any) -> None:
    tasks = ["replace", "replace", "add", "replace", "remove", "replace", "add", "remove", "replace", "replace"]
    picked = zoo.balanced_pick(tasks, 6)
    assert picked == [4, 2, 0, 7, 6, 1]  # remove, add, replace in turn; each task's first ones in the drawn order
    assert zoo.balanced_pick(tasks, 9) == [4, 2, 0, 7, 6, 1, 3, 5, 8]  # remove and add ran out: replace goes on
    assert sorted(zoo.balanced_pick(tasks, 100)) == list(range(len(tasks)))  # at most every item, once each
    assert zoo.balanced_pick(tasks, 0) == []


def test_members_whose_module_is_absent_are_skipped_with_a_note(zoo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name.endswith(".mgie") else real(name, *args)

    monkeypatch.setattr(zoo.importlib.util, "find_spec", find_spec)
    chosen, notes = zoo.available_members(["insightedit", "mgie", "instruct_pix2pix"])
    assert chosen == ["instruct_pix2pix", "insightedit"]  # the paper's order
    assert notes == {"mgie": "skipped: insightedit/models/members/mgie.py is absent"}


def groups(inside: float, outside: float, lpips: float | None = 0.2, target: float = 12.0) -> dict[str, Any]:
    """A row's scores of one phrasing: the same numbers for ``all`` and each task."""
    metrics = {"n": 4, "psnr": outside, "ssim": 0.5, "lpips": lpips, "psnr_target": target, "psnr_in_mask": inside}
    return {group: dict(metrics) for group in ("all", "remove", "add", "replace")}


def seed_scores(rows: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """``{row: (in-mask, outside)}`` → one seed's scores, both phrasings alike."""
    return {row: {p: groups(*values) for p in ("templated", "reasoning")} for row, values in rows.items()}


def test_summary_is_the_mean_and_the_spread_over_seeds(stats: Any) -> None:
    per_seed = {
        0: seed_scores({"A": (10.0, 30.0)}),
        1: seed_scores({"A": (11.0, 27.0)}),
    }
    per_seed[1]["A"]["templated"]["all"]["lpips"] = None  # not computed in one seed: left out
    summary = stats.summarize(per_seed)
    inside = summary["A"]["templated"]["all"]["psnr_in_mask"]
    assert inside.values == (10.0, 11.0)
    assert inside.mean == pytest.approx(10.5)
    assert inside.spread == pytest.approx(1.0)
    assert summary["A"]["templated"]["all"]["psnr"].spread == pytest.approx(3.0)
    assert "lpips" not in summary["A"]["templated"]["all"]
    assert summary["A"]["reasoning"]["all"]["lpips"].spread == 0.0
    assert stats.as_json(summary)["A"]["templated"]["all"]["psnr"] == {
        "values": [30.0, 27.0],
        "mean": 28.5,
        "spread": 3.0,
    }


def test_an_ordering_holds_beyond_the_spread_only_when_the_means_differ_by_more(stats: Any) -> None:
    rows = lambda a, b, c, d: {  # noqa: E731  (InsightEdit in-mask per seed, w/o IAA in-mask per seed)
        0: seed_scores({stats.INSIGHTEDIT: (a, 25.0), stats.NO_IAA: (c, 25.0)}),
        1: seed_scores({stats.INSIGHTEDIT: (b, 25.0), stats.NO_IAA: (d, 25.0)}),
    }
    claim = stats.Claim("iaa", (stats.INSIGHTEDIT, stats.NO_IAA), "templated", "psnr_in_mask")
    beyond = stats.ordering_lines(stats.summarize(rows(12.0, 12.5, 10.0, 10.8)), (claim,))[0]
    assert beyond["holds_beyond_spread"] is True  # margin 1.85 > spread max(0.5, 0.8)
    assert beyond["pairs"][0]["margin"] == pytest.approx(1.85)
    assert beyond["pairs"][0]["spread"] == pytest.approx(0.8)
    assert beyond["pairs"][0]["verdict"] == "holds beyond the spread"
    within = stats.ordering_lines(stats.summarize(rows(12.0, 10.0, 10.0, 11.5)), (claim,))[0]
    assert within["holds_beyond_spread"] is False  # margin 0.25 < spread 2
    assert within["pairs"][0]["verdict"] == "holds within the spread"
    reversed_ = stats.ordering_lines(stats.summarize(rows(9.0, 9.2, 12.0, 12.1)), (claim,))[0]
    assert reversed_["pairs"][0]["verdict"] == "reversed beyond the spread"
    missing = stats.ordering_lines(stats.summarize({0: seed_scores({stats.INSIGHTEDIT: (1.0, 1.0)})}), (claim,))[0]
    assert missing["holds_beyond_spread"] is None


def test_a_chain_needs_every_pair_and_lpips_is_better_lower(stats: Any) -> None:
    per_seed = {
        s: {
            stats.INSIGHTEDIT: {p: groups(12.0 + s, 25.0, lpips=0.10) for p in ("templated", "reasoning")},
            stats.SMARTEDIT: {p: groups(10.0 + s, 25.0, lpips=0.20) for p in ("templated", "reasoning")},
            stats.PIX2PIX: {p: groups(10.5 + s, 25.0, lpips=0.30) for p in ("templated", "reasoning")},
            stats.NO_IAA: {p: groups(12.0, 25.0, lpips=0.15 + 0.01 * s) for p in ("templated", "reasoning")},
        }
        for s in (0, 1)
    }
    lines = {line["claim"]: line for line in stats.ordering_lines(stats.summarize(per_seed))}
    chain = lines["reasoning, in-mask PSNR"]
    assert [p["verdict"] for p in chain["pairs"]] == ["holds beyond the spread", "reversed within the spread"]
    assert chain["holds_beyond_spread"] is False
    lpips = lines["IAA, background LPIPS"]  # 0.10 vs 0.155 (spread 0.01): lower is better
    assert lpips["pairs"][0]["margin"] == pytest.approx(0.055)
    assert lpips["holds_beyond_spread"] is True


def test_target_is_three_db_over_identity_on_each_task_and_a_30_db_background(stats: Any) -> None:
    def summary(remove: float, background: float) -> Any:
        seed = seed_scores({stats.IDENTITY: (7.0, stats.PSNR_CAP_DB), stats.INSIGHTEDIT: (10.5, background)})
        seed[stats.INSIGHTEDIT]["templated"]["remove"]["psnr_in_mask"] = remove
        return stats.summarize({0: seed, 1: seed})

    met = stats.target_check(summary(10.0, 31.0))
    assert met["met"] is True
    assert met["tasks"]["add"]["gain"] == pytest.approx(3.5)
    short = stats.target_check(summary(9.5, 31.0))  # remove +2.5 dB
    assert short["met"] is False and short["tasks"]["remove"]["met"] is False and short["background_met"] is True
    assert stats.target_check(summary(10.0, 29.0))["background_met"] is False
    assert "remove +2.5 dB, add +3.5 dB, replace +3.5 dB; background 31.0 dB → NOT met" in stats.target_text(short)
    assert stats.target_check(stats.summarize({0: seed_scores({"A": (1.0, 1.0)})}))["met"] is None


def test_table_shows_the_mean_and_each_seed_and_the_cap_once(stats: Any) -> None:
    per_seed = {
        0: seed_scores({stats.IDENTITY: (7.0, stats.PSNR_CAP_DB), stats.INSIGHTEDIT: (10.0, 30.0)}),
        1: seed_scores({stats.IDENTITY: (7.4, stats.PSNR_CAP_DB), stats.INSIGHTEDIT: (11.0, 28.0)}),
    }
    text = stats.markdown(stats.summarize(per_seed), [0, 1], "ST-LPIPS")
    rows = [line for line in text.splitlines() if line.startswith(f"| {stats.INSIGHTEDIT} ")]
    assert len(rows) == 2  # a table per phrasing
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1:4] == ["10.5 (10.0 / 11.0)"] * 3  # in-mask per task
    assert cells[4] == "29.0 (30.0 / 28.0)"  # outside, remove
    assert cells[-1] == "0.200 (0.200 / 0.200)"
    identity = next(line for line in text.splitlines() if line.startswith(f"| {stats.IDENTITY} "))
    assert "| ∞ |" in identity and "7.2 (7.0 / 7.4)" in identity
    assert "Target (InsightEdit" in text
    no_iaa = "- IAA, in-mask PSNR, InsightEdit > InsightEdit w/o IAA on templated psnr_in_mask: not measured (a row"
    assert no_iaa in text  # w/o IAA is not in this table


def test_cli_defaults_are_both_seeds_and_the_stage3_steps(zoo: Any) -> None:
    args = zoo.parse_args([])
    assert args.seeds == [0, 1]
    assert args.steps == zoo.DEFAULT_STEPS and args.eval_pairs == zoo.DEFAULT_EVAL_PAIRS
    assert args.align_steps == zoo.DEFAULT_ALIGN_STEPS > 0  # the paper's order: align, then stage 3
    assert args.foundations is None and not args.no_build and args.jobs == 2
    args = zoo.parse_args(["--seeds", "3", "--foundations", "/tmp/f", "--no-build", "--steps", "5"])
    assert args.seeds == [3] and args.foundations == Path("/tmp/f") and args.no_build and args.steps == 5


def test_a_worker_runs_one_seed_of_the_same_comparison(zoo: Any, tmp_path: Path) -> None:
    argv = ["--steps", "7", "--align-steps", "3", "--eval-pairs", "9", "--batch-size", "4", "--no-wandb"]
    args = zoo.parse_args(argv)
    argv = zoo.worker_argv(args, 1, ["mgie", "insightedit"], Path("/f"), "zoo-g", 1, tmp_path)
    worker = zoo.parse_args(argv)
    assert (worker.worker_seed, worker.worker_out, worker.foundations) == (1, tmp_path, Path("/f"))
    assert worker.no_build and worker.no_wandb and worker.wandb_group == "zoo-g"  # the parent built them
    assert (worker.steps, worker.eval_pairs, worker.batch_size, worker.threads) == (7, 9, 4, 1)
    assert worker.align_steps == 3
    assert worker.members == ["mgie", "insightedit"] and worker.max_minutes is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--seeds", "0", "0"], ["--steps", "0"], ["--eval-pairs", "0"], ["--seeds"], ["--jobs", "0"],
        ["--align-steps", "-1"],
    ],  # fmt: skip
)
def test_cli_rejects_repeated_seeds_and_empty_runs(zoo: Any, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        zoo.parse_args(argv)


def test_members_start_from_the_foundations_root(zoo: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("INSIGHTEDIT_FOUNDATIONS", str(tmp_path))
    evaluation = {"protocol": "advancededit"}
    insight = zoo.starting_points(zoo.member_settings("insightedit", tmp_path, evaluation))
    assert insight == {
        "comprehension.pretrained": f"{tmp_path}/mllm/export",
        "bridging.clip_pretrained": f"{tmp_path}/clip/export",
        "generation.pretrained": f"{tmp_path}/instruct_pix2pix/last.ckpt",
        "generation.text_encoder": f"{tmp_path}/clip/export",
    }
    pix2pix = zoo.member_settings("instruct_pix2pix", tmp_path, evaluation)  # its yaml builds the UNet foundation
    assert pix2pix["generation"]["pretrained"] == str(tmp_path / "instruct_pix2pix" / "last.ckpt")
    assert pix2pix["stage"] == 3 and pix2pix["evaluation"] == evaluation


def test_seed_data_is_the_shared_data_with_the_seed(zoo: Any) -> None:
    shared = {"data": {"init_args": {"synthetic": {"num_images": 20, "size": 32, "seed": 0}, "batch_size": 16}}}
    args = zoo.seed_data_args(shared, 1, None)
    assert args == {"synthetic": {"num_images": 20, "size": 32, "seed": 1}, "batch_size": 16, "seed": 1}
    assert shared["data"]["init_args"]["synthetic"]["seed"] == 0  # not changed in place
    assert zoo.seed_data_args(shared, 0, 8)["batch_size"] == 8


def test_missing_foundations_without_build_are_one_line(zoo: Any, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="insightedit foundations --out"):
        zoo.ensure_foundations(tmp_path, build=False)
    for foundation in zoo.FOUNDATIONS:
        done = tmp_path / foundation.name / foundation.done
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("{}")
        stamp = {"metric": {"accuracy": 0.5}, "minutes": 1.5, "inputs": {"recipe": "x"}, "date": "d"}
        (tmp_path / foundation.name / zoo.STAMP).write_text(json.dumps(stamp))
    records = zoo.ensure_foundations(tmp_path, build=False)
    assert set(records) == {f.name for f in zoo.FOUNDATIONS}
    assert records["clip"]["metric"] == {"accuracy": 0.5} and records["clip"]["build_minutes"] == 1.5
    assert records["clip"]["checked_current"] is False and records["clip"]["built_by_this_run"] is False


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
