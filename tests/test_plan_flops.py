"""``insightedit plan``'s FLOPs, GPU verdicts and GPU-hours, against hand computation and torch's own counter."""

import inspect

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from insightedit.cli import main
from insightedit.planning.flops import count_training_flops
from insightedit.planning.hardware import GPUS, Gpu, gpu_hours, gpu_named, memory_verdict


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTEDIT_CACHE", str(tmp_path / "cache"))


def _two_linears(first_trains: bool) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    net[0].requires_grad_(first_trains)
    return net


def _groups(name: str) -> str:
    return "bridge" if name == "0" else "unet"


def test_frozen_layers_compute_input_gradients_only_when_something_before_them_trains():
    x = torch.randn(3, 10)  # the data needs no gradient
    net = _two_linears(False)
    frozen_first = count_training_flops(net, lambda: net(x).sum(), _groups)
    # forward: 2·B·in·out per layer; backward: only the trained second layer's weight gradient (its input's
    # gradient is not needed: nothing before it trains)
    assert frozen_first["bridge"].as_dict() == {"forward": 1200, "backward": 0, "recompute": 0, "total": 1200}
    assert 1200 == 2 * 3 * 10 * 20
    assert (frozen_first["unet"].forward, frozen_first["unet"].backward) == (2 * 3 * 20 * 5, 2 * 3 * 20 * 5)
    net = _two_linears(True)
    both = count_training_flops(net, lambda: net(x).sum(), _groups)
    # now the second layer also passes the gradient to its input, and the first computes its weight gradient
    assert both["unet"].backward == 2 * (2 * 3 * 20 * 5)
    assert both["bridge"].backward == 2 * 3 * 10 * 20


def test_checkpointing_recomputes_only_blocks_the_backward_runs_through():
    x = torch.randn(3, 10)
    net = _two_linears(False)
    counted = count_training_flops(net, lambda: net(x).sum(), _groups, checkpointed=("Linear",))
    assert counted["bridge"].recompute == 0  # frozen, no gradient reaches it: nothing to recompute
    assert counted["unet"].recompute == counted["unet"].forward == 2 * 3 * 20 * 5


def test_a_small_unet_on_meta_matches_torchs_own_flop_counter():
    from diffusers import UNet2DConditionModel

    torch.set_default_device("meta")  # as plan runs it (on the CPU torch's counter misses the fused attention)
    try:
        unet = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
        )  # fmt: skip
        args = (torch.randn(2, 8, 8, 8), torch.tensor([10, 20]), torch.randn(2, 7, 16))
    finally:
        torch.set_default_device(None)

    def step() -> torch.Tensor:
        return unet(*args).sample.square().mean()

    with FlopCounterMode(display=False) as reference:
        step().backward()
    counted = count_training_flops(unet, step, lambda name: "unet")
    assert set(counted) == {"unet"}
    assert counted["unet"].forward + counted["unet"].backward == reference.get_total_flops() > 0
    assert counted["unet"].backward == pytest.approx(2 * counted["unet"].forward, rel=0.05)  # all of it trains


@pytest.mark.parametrize("embeddings_train", [True, False])
def test_stacks_counted_from_two_layers_equal_all_layers(embeddings_train):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                            vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)  # fmt: skip
    model = CLIPTextModel(config)
    model.embeddings.requires_grad_(embeddings_train)  # frozen: the first layer's input needs no gradient
    ids = torch.randint(0, 100, (2, 16))

    def step() -> torch.Tensor:
        return model(ids).last_hidden_state.square().mean()

    def group(name: str) -> str:
        return "mllm"

    two = count_training_flops(model, step, group, checkpointed=("CLIPEncoderLayer",))
    assert len(model.encoder.layers) == 5  # restored
    full = count_training_flops(model, step, group, checkpointed=("CLIPEncoderLayer",), stacks_two_deep=False)
    assert two["mllm"].as_dict() == full["mllm"].as_dict()
    assert full["mllm"].recompute > 0


def test_memory_verdicts_state_their_margin():
    card = Gpu("24 GB card", 24.0, 100.0)
    assert memory_verdict(5.9, card) == "fits"  # 5.9·1.1 + 1 = 7.49 ≤ 24
    assert memory_verdict(20.9, card) == "fits"  # 20.9·1.1 + 1 = 23.99
    assert memory_verdict(22.24, card) == "tight"  # QLoRA: 23.24 with the context, 25.46 with fragmentation too
    assert memory_verdict(23.5, card) == "no"  # 24.5 > 24
    names = [gpu.name for gpu in GPUS]
    assert names == ["RTX 3090/4090 24 GB", "A100 40 GB", "A100 80 GB", "H100 SXM 80 GB", "H200 141 GB"]


def test_gpu_hours_arithmetic():
    h100 = gpu_named("H100 SXM 80 GB")
    assert h100.bf16_tflops == 989.0 and gpu_named("A100 80 GB").bf16_tflops == 312.0
    # 29 TFLOP per sample, 202,822 samples, at 40 % of 989 TFLOP/s
    assert gpu_hours(29e12, 202_822, h100, 0.4) == pytest.approx(29e12 * 202_822 / (0.4 * 989e12) / 3600)
    assert gpu_hours(29e12, 202_822, h100, 0.4) == pytest.approx(4.13, abs=0.01)
    with pytest.raises(ValueError):
        gpu_hours(1.0, 1.0, h100, 0.0)


def test_an_overlay_alone_says_where_it_goes(capsys):
    assert main(["plan", "--config", "lightning_configs/qlora_1gpu.yaml"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("error: lightning_configs/qlora_1gpu.yaml is an overlay (no model.class_path)")
    assert "--config lightning_configs/stage3.yaml --config lightning_configs/qlora_1gpu.yaml" in error
    assert main(["plan", "--config", "lightning_configs/qlora_1gpu.yaml", "--mfu", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --mfu must be in (0, 1], got 2.0"


def test_planned_system_is_the_system_without_lightning():
    from insightedit.planning.build import SYSTEM_ARGUMENTS, planned_system
    from insightedit.systems.editor_system import EditorSystem

    assert tuple(inspect.signature(EditorSystem.__init__).parameters)[1:] == SYSTEM_ARGUMENTS
    for member, stage in (("insightedit", 1), ("smartedit", 3)):
        system = EditorSystem(member=member, preset="tiny", stage=stage)
        planned = planned_system({"member": member, "preset": "tiny", "stage": stage})
        trained = {name for name, p in planned.named_parameters() if p.requires_grad}
        assert trained == system.trainable_names() and trained
        assert {name for name, _ in planned.named_parameters()} == {name for name, _ in system.named_parameters()}
        assert planned.stage == system.stage
