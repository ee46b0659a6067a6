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


@pytest.fixture(autouse=True, scope="module")
def _session_cache(tmp_path_factory):
    """Plans computed here, once per config in this module (repeats read the module's own cache)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSIGHTEDIT_CACHE", str(tmp_path_factory.mktemp("plan_cache")))
        yield


def run_plan(capsys, *configs, devices=None, member=None):
    args = ["plan", "--json"] + [a for c in configs for a in ("--config", str(CONFIGS / c))]
    if devices is not None:
        args += ["--devices", str(devices)]
    if member is not None:
        args += ["--member", member]
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
    # the MLLM's forward FLOPs by hand (2 per multiply-add) from LLaVA-1.5-7B's config, s = 576 + 64 + 32
    h, f, layers, s, r, vocab = 4096, 11008, 32, 576 + 64 + 32, 32, 32064
    llm = 2 * s * layers * (4 * h * h + 3 * h * f) + layers * 4 * s * s * h + layers * 4 * 4 * s * h * 8  # + LoRA r=8
    vision = 2 * 577 * 24 * (4 * 1024**2 + 2 * 1024 * 4096) + 24 * 4 * 577**2 * 1024 + 2 * 576 * 3 * 14 * 14 * 1024
    projector, head = 2 * 576 * (1024 * h + h * h), 2 * r * h * (vocab + r)  # the head runs at the [MM] positions
    flops = plan["flops_per_sample"]["groups"]
    assert flops["mllm"]["forward"] == llm + vision + projector + head
    # frozen LLaMA under LoRA and trained [MM] rows: input gradients through every layer (≈ one more forward)
    assert 0.9 * llm < flops["mllm"]["backward"] < 1.1 * llm
    assert flops["unet"]["backward"] == pytest.approx(2 * flops["unet"]["forward"], rel=0.05)  # the UNet trains
    assert flops["encoders"]["backward"] == 0  # VAE, text encoder, CLIP target: frozen, nothing before them trains
    assert flops["mllm"]["recompute"] > 0 and flops["unet"]["recompute"] > 0  # both sections checkpoint
    assert plan["fits"]["gpus"]["H100 SXM 80 GB"]["verdict"] == "fits"
    hours = plan["gpu_hours"]["paper"]["gpu_hours"]["H100 SXM 80 GB"]
    assert hours == pytest.approx(plan["flops_per_sample"]["total"] * 202_822 / (0.4 * 989e12) / 3600, abs=0.05)


def test_stage_changes_what_trains_and_devices_change_sharding(capsys):
    stage1 = run_plan(capsys, "stage1.yaml")
    assert stage1["modules"]["unet"]["trainable"] == 0 and stage1["modules"]["bim"]["trainable"] == 0
    eight = run_plan(capsys, "stage3.yaml")["memory"]["bytes_per_device"]
    one = run_plan(capsys, "stage3.yaml", devices=1)["memory"]["bytes_per_device"]
    assert one["optimizer"] == pytest.approx(8 * eight["optimizer"], rel=1e-6)
    qlora_plan = run_plan(capsys, "stage3.yaml", "qlora_1gpu.yaml")
    qlora = qlora_plan["memory"]
    assert qlora["settings"]["quantization"] == "4bit" and qlora["settings"]["world_size"] == 1
    verdicts = {name: gpu["verdict"] for name, gpu in qlora_plan["fits"]["gpus"].items()}
    assert verdicts["RTX 3090/4090 24 GB"] in ("tight", "no") and verdicts["A100 40 GB"] == "fits"
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
    bad.write_text("model:\n  class_path: insightedit.systems.editor_system.EditorSystem\n"
                   "  init_args: {member: smartedit, preset: full, stage: 7}\n")
    assert main(["plan", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip().endswith("smartedit has stages [1, 2, 3], not 7")
    assert main(["plan", "--member", "pix2pix"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown member 'pix2pix'; the zoo has instruct_pix2pix")
    assert main(["plan"]) == 2
    assert capsys.readouterr().err.strip() == "error: plan needs --config <yaml> or --member <name>"


# ------------------------------------------------------------------------- every member, no member code
def _meta_count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def reference_unet() -> int:
    """diffusers' UNet from timbrooks/instruct-pix2pix's unet/config.json (written out: nothing is downloaded)."""
    from diffusers import UNet2DConditionModel

    config = {
        "in_channels": 8, "out_channels": 4, "sample_size": 64, "layers_per_block": 2, "cross_attention_dim": 768,
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }  # fmt: skip
    return _meta_count(lambda: UNet2DConditionModel(**config))


def reference_llava() -> int:
    """transformers' LLaVA-1.5-7B from llava-hf/llava-1.5-7b-hf's config.json (written out)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default")
    return _meta_count(lambda: LlavaForConditionalGeneration(config))


SD_VAE, SD_TEXT_ENCODER = 83_653_863, 123_060_480  # Stable Diffusion 1.5's VAE and CLIP ViT-L/14 text tower


def test_reference_architectures_by_their_own_libraries():
    assert reference_unet() == 859_532_484
    assert reference_llava() == 7_063_427_072


@pytest.mark.parametrize(
    ("config", "parts"),
    [
        ("instruct_pix2pix.yaml", {"unet", "vae", "text_encoder"}),
        ("smartedit.yaml", {"llava", "lora", "mm_embeddings", "qformer", "bim", "unet", "vae", "text_encoder"}),
        ("mgie.yaml", {"llava", "lora", "mm_embeddings", "edit_head", "unet", "vae", "text_encoder"}),
    ],
)
def test_every_member_config_plans_at_full_size_against_the_reference_architectures(capsys, config, parts):
    """The same command, no member code: the parts a member has, each the size its reference library builds."""
    plan = run_plan(capsys, config)
    modules = plan["modules"]
    assert set(modules) == parts
    assert modules["unet"]["params"] == reference_unet()
    assert modules["vae"] == {"params": SD_VAE, "trainable": 0}
    assert modules["text_encoder"] == {"params": SD_TEXT_ENCODER, "trainable": 0}
    if "llava" in parts:
        assert modules["llava"] == {"params": reference_llava(), "trainable": 0}
        assert modules["lora"]["params"] == 32 * 4 * 8 * (4096 + 4096)  # r=8 on q, k, v, o of 32 layers
    final = plan["stage"]
    assert final["name"] in ("edit", "full") and plan["member"] == config.removesuffix(".yaml")
    assert plan["total"]["trainable"] == sum(m["trainable"] for m in modules.values()) > 0
    memory = plan["memory"]
    assert memory["settings"]["strategy"] == "fsdp2" and memory["settings"]["world_size"] == 8
    assert memory["activation_parts_gib"]["unet"] > 0  # counted from the member's own training step


def test_member_shortcut_is_the_member_at_full_size_in_its_final_stage(capsys):
    from insightedit.commands.zoo import summarize

    plan = run_plan(capsys, "fsdp2_8gpu.yaml", member="insightedit_no_bim")
    modules = plan["modules"]
    assert "bim" not in modules and modules["mapper"]["trainable"] > 0 and plan["stage"]["name"] == "full"
    summary = summarize("insightedit_no_bim")  # the zoo's count, from the editor's groups instead of requires_grad
    assert plan["total"] == {"params": summary.total, "trainable": summary.trainable}
    assert plan["memory"]["settings"]["world_size"] == 8  # the overlay's trainer settings apply
