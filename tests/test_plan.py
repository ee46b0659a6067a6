"""``insightedit plan``: full-size counts with no weights, and the memory arithmetic it rests on."""

import json
import resource
from pathlib import Path

import pytest
import torch
from torch import nn

from insightedit.cli import main
from insightedit.planning.activations import count_saved_activations, decoder_activation_bytes
from insightedit.planning.inventory import ModuleCount
from insightedit.planning.memory import NF4_BYTES, PlanSettings, plan_memory

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def run_plan(capsys, *configs, devices=None):
    args = ["plan", "--json"] + [a for c in configs for a in ("--config", str(CONFIGS / c))]
    if devices is not None:
        args += ["--devices", str(devices)]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_stage3_plan_reports_the_full_size_counts_without_weights(capsys):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = run_plan(capsys, "stage3.yaml")
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert grown_gib < 2  # a 7B model in float32 would be 26 GiB
    modules = plan["modules"]
    assert modules["llava"] == {"params": 7_063_427_072, "trainable": 0}
    assert modules["unet"] == {"params": 859_532_484, "trainable": 859_532_484}
    assert modules["image_branch"]["params"] == 21_533_184
    assert modules["lora"] == {"params": 8_388_608, "trainable": 8_388_608}  # r=8 on q,k,v,o of 32 layers
    assert modules["mm_embeddings"]["trainable"] == 2 * 32 * 4096
    for frozen in ("clip_image_encoder", "vae", "text_encoder"):
        assert modules[frozen]["trainable"] == 0
    assert plan["total"]["params"] == sum(m["params"] for m in modules.values())
    assert plan["weights_named"]["comprehension.pretrained"] == "llava-hf/llava-1.5-7b-hf"
    memory = plan["memory"]
    assert memory["settings"]["strategy"] == "fsdp2" and memory["settings"]["world_size"] == 8
    parts = memory["bytes_per_device"]
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_stage_changes_what_trains_and_devices_change_sharding(capsys):
    stage1 = run_plan(capsys, "stage1.yaml")
    assert stage1["modules"]["unet"]["trainable"] == 0 and stage1["modules"]["bim"]["trainable"] == 0
    eight = run_plan(capsys, "stage3.yaml")["memory"]["bytes_per_device"]
    one = run_plan(capsys, "stage3.yaml", devices=1)["memory"]["bytes_per_device"]
    assert one["optimizer"] == pytest.approx(8 * eight["optimizer"], rel=1e-6)
    qlora = run_plan(capsys, "stage3.yaml", "qlora_1gpu.yaml")["memory"]
    assert qlora["settings"]["quantization"] == "4bit" and qlora["settings"]["world_size"] == 1
    assert qlora["bytes_per_device"]["weights"] < one["weights"] - 8 * 2**30


def test_missing_config_is_one_line(capsys):
    assert main(["plan", "--config", "no/such.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: config no/such.yaml not found"


def test_memory_arithmetic():
    counts = {
        "llava": ModuleCount(params=1000, trainable=0, frozen_16bit_linear=800),
        "lora": ModuleCount(params=10, trainable=10),
        "vae": ModuleCount(params=100, trainable=0),
    }
    mixed = PlanSettings(precision="bf16-mixed", llm_dtype="bfloat16")
    plan = plan_memory(nn.Linear(1, 1), counts, mixed, {"x": 7})
    assert plan.weights == 10 * 4 + 1000 * 2 + 100 * 4
    assert (plan.gradients, plan.optimizer, plan.activations) == (40, 80, 7)
    quantized = plan_memory(nn.Linear(1, 1), counts, PlanSettings(precision="bf16-mixed", llm_dtype="bfloat16",
                                                               quantization="4bit"), {})
    assert quantized.weights == int(10 * 4 + 800 * NF4_BYTES + 200 * 2 + 100 * 4)
    fsdp = plan_memory(nn.Linear(1, 1), counts, PlanSettings(precision="bf16-mixed", llm_dtype="bfloat16",
                                                          strategy="fsdp", devices=4), {})
    assert fsdp.optimizer == 80 // 4 and fsdp.weights == (10 * 4 + 1000 * 2 + 100 * 4) // 4


def test_saved_activation_count_on_a_known_network():
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(3, 10, requires_grad=True)
    counted = count_saved_activations(net, lambda: net(x).sum())
    # autograd keeps: x for the first weight's gradient (3x10) and the ReLU output, which is also the
    # second Linear's input, once (3x20); weights are parameters and not counted
    assert counted.total == (3 * 10 + 3 * 20) * 4


def test_checkpointing_estimate_keeps_block_inputs_and_one_block():
    from insightedit.planning.activations import SavedActivations

    saved = SavedActivations(total=1000, block_saved=[300, 500], block_inputs=[10, 20])
    assert saved.with_checkpointing() == 1000 - 800 + 30 + 500


def test_decoder_activation_formula():
    assert decoder_activation_bytes(32, 4096, 672, 4, 2, checkpointing=False) == 32 * 34 * 672 * 4096 * 4
    assert decoder_activation_bytes(32, 4096, 672, 4, 2, checkpointing=True) == (
        32 * 2 * 672 * 4096 * 4 + 34 * 672 * 4096 * 4
    )


def test_tiny_config_plans_with_real_tensors(capsys):
    plan = run_plan(capsys, "tiny/stage3.yaml")
    assert plan["modules"]["unet"]["params"] == plan["modules"]["unet"]["trainable"] > 1_000_000
    assert plan["memory"]["settings"]["precision"] == "32-true"
    assert 0 < plan["memory"]["bytes_per_device"]["activations"] < 2**30


def test_a_config_the_model_rejects_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: insightedit.systems.insightedit.InsightEditSystem\n"
                   "  init_args: {preset: full, stage: 7}\n")
    assert main(["plan", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip().endswith("stage must be 1, 2 or 3, got 7")
