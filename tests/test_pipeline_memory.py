"""``insightedit plan --edit``: peak memory of one edit, per precision, 4-bit MLLM and memory mode."""

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
    return {(r["dtype"], r["quantization"], r["memory_mode"]): r for r in rows}


def test_tiny_edit_plan_orders_the_settings():
    from insightedit.planning.edit_memory import plan_edit_memory
    from insightedit.systems.editor_system import EditorSystem

    system = EditorSystem(member="insightedit", preset="tiny", generation={"latent": "vae"}).to("meta")
    rows = {(r.dtype, r.quantization, r.memory_mode): r for r in plan_edit_memory(system, 64)}
    assert len(rows) == 14  # 2 dtypes x (full, low, sequential with the 16-bit MLLM; full, low with the 4-, 8-bit)
    assert (rows[("float16", "4bit", "low")].four_bit, rows[("float16", "8bit", "low")].eight_bit) == (True, True)
    for dtype in ("float16", "bfloat16"):
        assert rows[(dtype, None, "sequential")].peak <= rows[(dtype, None, "low")].peak
        assert rows[(dtype, None, "low")].peak < rows[(dtype, None, "full")].peak
        four, eight, sixteen = (rows[(dtype, bits, "full")].weights["mllm"] for bits in ("4bit", "8bit", None))
        assert four < eight < sixteen
        assert min(rows[(dtype, None, "full")].activations.values()) > 0
        assert rows[(dtype, None, "full")].moved == 0 < rows[(dtype, None, "sequential")].moved
    assert rows[("float16", "4bit", "low")].peak == rows[("bfloat16", "4bit", "low")].peak


def test_full_size_edit_at_512_fits_8_gb_in_low_memory_with_the_4bit_mllm(capsys):
    rows = by_setting(run_plan(capsys, "stage3.yaml", 512))
    resident = rows[("float16", None, "full")]
    assert resident["weights_gib"]["mllm"] == pytest.approx(7_063_427_072 * 2 / GIB, rel=0.01)  # LLaVA-7B in 16 bit
    assert resident["weights_gib"]["unet"] == pytest.approx(881_065_668 * 2 / GIB, rel=0.01)  # UNet + image branch
    assert not resident["fits_8_gb"]
    low = rows[("float16", "4bit", "low")]  # the 4-bit MLLM stays on the accelerator while the UNet runs
    w = low["weights_gib"]
    assert low["fits_8_gb"] and low["peak_gib"] >= round(w["mllm"] + w["unet"] + w["vae"], 2)
    assert rows[("bfloat16", None, "low")]["peak_gib"] > 8  # low-memory alone cannot hold the 16-bit 7B MLLM
    # the 8-bit MLLM: the LLM's frozen linear weights (6.48e9 for LLaVA-7B's 32 layers) at 1 byte instead of 2
    eight = rows[("float16", "8bit", "full")]["weights_gib"]["mllm"]
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert eight == pytest.approx(resident["weights_gib"]["mllm"] - linear / GIB, abs=0.01)


def test_full_size_sequential_edit_at_512_fits_8_gb_without_quantization(capsys):
    rows = by_setting(run_plan(capsys, "stage3.yaml", 512))
    assert ("float16", "4bit", "sequential") not in rows and ("float16", "8bit", "sequential") not in rows
    # by hand, from LLaVA-1.5-7B's config (hidden 4096, MLP 11008, 32 layers, vocab 32064) and stage 3's
    # LoRA (r = 8 on q, k, v, o): the largest block the offload streams is one LLaMA decoder layer
    h, f, r = 4096, 11008, 8
    decoder_layer = 4 * h * h + 3 * h * f + 2 * h  # attention, MLP, two RMSNorms: 202,383,360
    assert decoder_layer == 202_383_360
    lora = 4 * r * (h + h)
    embedding = 32064 * h + 32 * h  # frozen rows + [MM] rows: smaller than a layer
    assert embedding < decoder_layer
    block = (decoder_layer + lora) * 2  # fp16 bytes: 405,291,008
    for dtype in ("float16", "bfloat16"):
        row = rows[(dtype, None, "sequential")]
        assert row["largest_mllm_block_bytes"] == block
        w, a = row["weights_gib"], row["activations_gib"]
        understand = block / GIB + w["bridge"] + max(a["mllm"], a["bridge"])
        generate = w["unet"] + w["vae"] + max(a["unet"], a["vae"])
        assert row["peak_gib"] == pytest.approx(max(understand, generate), abs=0.01)
        assert row["peak_bytes"] < 8e9 and row["fits_8_gb"] and row["peak_gib"] < 3
        # one way per edit: the MLLM without its output head (32064 x 4096, never run) + swaps of the rest
        streamed = 7_063_427_072 + 8_388_608 + 2 * 32 * h - 32064 * h - 32 * h
        swapped = 2 * (w["bridge"] + w["unet"] + w["vae"]) * GIB
        assert row["moved_gb_per_edit"] == pytest.approx((2 * streamed + swapped) / 1e9, abs=0.02)
        assert row["transfer_s_estimate"] == pytest.approx(row["moved_gb_per_edit"] / 25, abs=0.01)
