"""``insightedit plan --edit``: peak memory of one edit, per precision, 4-bit MLLM and low-memory mode."""

import json
from pathlib import Path

import pytest
import torch

from insightedit.cli import main
from insightedit.planning.edit_memory import GIB, LiveBytes, peak_activation_bytes

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def test_live_bytes_counts_what_is_alive_at_the_peak():
    with torch.device("meta"):
        x = torch.empty(1000, 1000)  # 4 MB, made before counting: not counted

    def forward():
        y = x * 2  # +4 MB
        z = y + 1  # +4 MB (y still alive): 8 MB
        del y  # -4 MB
        w = z.view(-1)  # a view: nothing new
        w.add_(1)  # in place: nothing new
        return z.sum()

    assert peak_activation_bytes(forward) == 8_000_000 + 4  # + the 4-byte sum, made while z is alive
    mode = LiveBytes()
    with torch.no_grad(), mode:
        kept = x * 3
    assert mode.live == 4_000_000 and mode.peak == 4_000_000
    del kept


def test_fused_attention_keeps_no_score_matrix():
    with torch.device("meta"):
        q = torch.empty(1, 8, 4096, 40, dtype=torch.float16)
    peak = peak_activation_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert peak == q.numel() * 2  # the output only, not 8 × 4096² scores


def run_plan(capsys, config: str, resolution: int) -> list[dict]:
    assert main(["plan", "--config", str(CONFIGS / config), "--edit", "--resolution", str(resolution), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def by_setting(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["dtype"], r["four_bit_mllm"], r["low_memory"]): r for r in rows}


def test_tiny_edit_plan_orders_the_settings():
    from insightedit.planning.edit_memory import plan_edit_memory
    from insightedit.systems.insightedit import InsightEditSystem

    system = InsightEditSystem(preset="tiny", generation={"latent": "vae"}).to("meta")
    rows = {(r.dtype, r.four_bit, r.low_memory): r for r in plan_edit_memory(system, 64)}
    assert len(rows) == 8
    for dtype in ("float16", "bfloat16"):
        assert rows[(dtype, False, True)].peak < rows[(dtype, False, False)].peak
        assert rows[(dtype, True, False)].weights["mllm"] < rows[(dtype, False, False)].weights["mllm"]
        assert min(rows[(dtype, False, False)].activations.values()) > 0
    assert rows[("float16", True, True)].peak == rows[("bfloat16", True, True)].peak


def test_full_size_edit_at_512_fits_8_gb_in_low_memory_with_the_4bit_mllm(capsys):
    rows = by_setting(run_plan(capsys, "stage3.yaml", 512))
    resident = rows[("float16", False, False)]
    assert resident["weights_gib"]["mllm"] == pytest.approx(7_063_427_072 * 2 / GIB, rel=0.01)  # LLaVA-7B in 16 bit
    assert resident["weights_gib"]["unet"] == pytest.approx(881_065_668 * 2 / GIB, rel=0.01)  # UNet + image branch
    assert not resident["fits_8_gb"]
    low = rows[("float16", True, True)]
    assert low["fits_8_gb"] and low["peak_gib"] < 6
    assert rows[("bfloat16", False, True)]["peak_gib"] > 8  # low-memory alone cannot hold the 16-bit 7B MLLM
