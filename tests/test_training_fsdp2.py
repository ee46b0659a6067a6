"""FSDP2 (``fully_shard`` through Lightning's ModelParallelStrategy) on the CPU with gloo.

In-process, one rank: the sharded system computes the unsharded system's losses, gradients and edits.
Real ``insightedit fit`` runs, two processes: every parameter is a DTensor shard (trainable and frozen side
by side in one unit), ranks agree, only the stage's weights move, ``last.ckpt`` is one file of trained
weights that starts a non-sharded system, and resuming from it (and from a distributed-checkpoint
folder) continues exactly.
"""

import json
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.distributed as dist
from _training_runs import environment, run_fit, small_config
from test_system import make_batch

from insightedit.errors import UserError
from insightedit.systems.editor_system import EditorSystem
from insightedit.training.sharding import (
    FSDP2Strategy,
    ShardingSettings,
    shard_system,
    sharded_blocks,
    sharded_units,
)

STRATEGY = "insightedit.training.sharding.FSDP2Strategy"
TWO_PROCESSES = (
    f"--trainer.strategy.class_path={STRATEGY}",
    "--trainer.devices=2",
    "--trainer.accelerator=cpu",
    "--trainer.gradient_clip_val=1.0",
)  # the full configs clip: DTensor gradients must clip too


# ------------------------------------------------------------------------------- one process, in process
@pytest.fixture
def one_rank_mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _tiny(generation: dict | None = None, member: str = "insightedit", **kwargs) -> EditorSystem:
    torch.manual_seed(0)
    generation = {"prediction_type": "sample", "residual": True, **(generation or {})}
    return EditorSystem(member=member, preset="tiny", stage=3, generation=generation, **kwargs)


def _batch(system: EditorSystem, explicit: bool = True) -> dict:
    """Two pairs for any member (``plain_instruction`` is what MGIE reads as its expressive instruction)."""
    g = torch.Generator().manual_seed(0)
    size = system.editor.mllm_image_size() or 32
    batch = {
        "source": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "target": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "mllm_source": torch.randn(2, 3, size, size, generator=g),
        "clip_target": torch.randn(2, 3, 32, 32, generator=g),
        "instruction": ["remove the red circle", "add a blue square"],
        "target_caption": ["a green square", "a red circle and a blue square"],
    }
    if explicit:
        batch["plain_instruction"] = ["remove the red circle", "add a blue square to the left"]
    return batch


@pytest.mark.parametrize("checkpointing", ["none", "sharding", pytest.param("models", marks=pytest.mark.slow)])
def test_one_rank_fsdp2_matches_the_unsharded_system(one_rank_mesh, checkpointing):
    from torch.distributed.tensor import DTensor, Shard

    own = checkpointing == "models"  # the models' own gradient checkpointing, composed with FSDP2's hooks
    system = _tiny(comprehension={"gradient_checkpointing": own}, generation={"gradient_checkpointing": own})
    batch = make_batch(system)
    names, saved = set(system.state_dict()), system.saved_names()
    torch.manual_seed(1)
    expected = system.compute_losses(batch)
    expected["loss"].backward()
    grads = {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}
    system.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    edited = system.edit(batch["source"], batch["mllm_source"], batch["instruction"], num_inference_steps=2)

    settings = ShardingSettings(activation_checkpointing=checkpointing == "sharding")
    counts = shard_system(system, one_rank_mesh, settings)
    assert counts["blocks"] == len(list(sharded_blocks(system))) >= 15 and counts["units"] == 8
    assert counts["checkpointed"] == (counts["blocks"] if checkpointing == "sharding" else 0)
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in system.parameters())
    assert set(system.state_dict()) == names and system.saved_names() == saved  # names unchanged
    again = shard_system(system, one_rank_mesh, settings)  # configure_model may run twice: nothing more
    assert again == {"blocks": 0, "units": 0, "checkpointed": 0, "parameters": counts["parameters"]}

    torch.manual_seed(1)
    loss = system.training_step(batch, 0)  # a registered FSDP forward method: the root and units gather
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-6, atol=1e-6)
    loss.backward()
    sharded_grads = {n: p.grad.full_tensor() for n, p in system.named_parameters() if p.grad is not None}
    assert sharded_grads.keys() == grads.keys() == system.trainable_names()  # frozen parameters get none
    for name, grad in grads.items():
        torch.testing.assert_close(sharded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.manual_seed(2)  # edit: the VAE/CLIP/UNet methods called outside forward are registered too
    again_edited = system.edit(batch["source"], batch["mllm_source"], batch["instruction"], num_inference_steps=2)
    torch.testing.assert_close(again_edited, edited, rtol=1e-5, atol=1e-5)


# every member shards with the same code: units by module kind, plus an editor part left unsharded (MGIE's head)
@pytest.mark.parametrize(
    ("member", "units"),
    [("instruct_pix2pix", {"editor.generation.unet", "editor.generation.text_encoder"}),
     ("mgie", {"editor.comprehension", "editor.generation.unet", "editor.generation.text_encoder", "editor.head"})],
)  # fmt: skip
def test_one_rank_fsdp2_matches_the_unsharded_system_for_other_members(one_rank_mesh, member, units):
    from torch.distributed.tensor import DTensor

    system = _tiny(member=member)
    found = {name for name, _, _ in sharded_units(system)}
    assert found == units  # editor parts become units only when no shared unit holds their parameters
    blocks = {name for name, _ in sharded_blocks(system)}
    if member == "mgie":  # the edit head's PyTorch encoder and decoder layers are blocks (1 + 1 at tiny size)
        transformer = system.editor.head.transformer
        head_blocks = {n for n in blocks if n.startswith("editor.head.")}
        assert len(head_blocks) == len(transformer.encoder.layers) + len(transformer.decoder.layers) == 2
    batch = _batch(system)
    torch.manual_seed(1)
    expected = system.compute_losses(batch)
    expected["loss"].backward()
    grads = {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}
    system.zero_grad(set_to_none=True)
    system.eval()
    unexplained = _batch(system, explicit=False)  # MGIE writes its expressive instruction (generate_answers)
    torch.manual_seed(2)
    edited = system.edit(unexplained["source"], unexplained["mllm_source"], unexplained["instruction"],
                         num_inference_steps=2)
    system.train()

    counts = shard_system(system, one_rank_mesh, ShardingSettings())
    assert counts["units"] == len(units) and counts["blocks"] == len(blocks)
    assert all(isinstance(p, DTensor) for p in system.parameters())
    torch.manual_seed(1)
    loss = system.training_step(batch, 0)
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-6, atol=1e-6)
    loss.backward()
    sharded_grads = {n: p.grad.full_tensor() for n, p in system.named_parameters() if p.grad is not None}
    assert sharded_grads.keys() == grads.keys() == system.trainable_names()
    for name, grad in grads.items():
        torch.testing.assert_close(sharded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    system.eval()
    torch.manual_seed(2)
    again = system.edit(unexplained["source"], unexplained["mllm_source"], unexplained["instruction"],
                        num_inference_steps=2)
    torch.testing.assert_close(again, edited, rtol=1e-5, atol=1e-5)


def test_a_quantized_llm_cannot_be_sharded_and_says_so():
    system = _tiny(comprehension={"quantization": "4bit"})
    with pytest.raises(UserError, match=r"FSDP2 cannot shard a 4-/8-bit .*quantization to null"):
        shard_system(system, mesh=None, settings=ShardingSettings())  # type: ignore[arg-type]


def test_sharding_settings_choose_the_mixed_precision_policy():
    settings = ShardingSettings()
    bf16 = settings.mixed_precision("bf16-mixed")
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    full = settings.mixed_precision("32-true")
    assert full.param_dtype is None and full.reduce_dtype is None
    assert ShardingSettings(param_dtype="float32").mixed_precision("bf16-mixed").param_dtype == torch.float32
    with pytest.raises(ValueError, match="unknown sharding settings"):
        ShardingSettings.from_config({"activation_checkpoint": True})
    with pytest.raises(ValueError, match="param_dtype"):
        ShardingSettings(param_dtype="int8")


def test_configure_model_leaves_other_strategies_alone():
    system = _tiny()
    system.configure_model()  # no trainer
    system.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    system.configure_model()
    assert not any(type(p).__name__ == "DTensor" for p in system.parameters())
    assert FSDP2Strategy().save_distributed_checkpoint is False


# ------------------------------------------------------------------------------- two processes, real fits
def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _rebuilt(hyper_parameters: dict, init_from) -> EditorSystem:
    """The run's system, not sharded, started from ``init_from`` (frozen weights from the run's seed)."""
    L.seed_everything(0)
    arguments = {k: v for k, v in hyper_parameters.items() if not k.startswith("_")}  # not LightningCLI's
    return EditorSystem(**{**arguments, "init_from": str(init_from)})


def _fit(root, name, *extra, max_steps, ckpt_path=None):
    probe = {"class_path": "_training_runs.RecordShards", "init_args": {"out_dir": str(root / name / "probe")}}
    config = small_config(root, name, max_steps=max_steps, every=2, extra_callbacks=[probe])
    resume = ("--ckpt_path", str(ckpt_path)) if ckpt_path else ()
    run_fit(config, root, *TWO_PROCESSES, *extra, *resume, timeout=600)
    return [_load(root / name / "probe" / f"rank{r}.pt") for r in (0, 1)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """3 steps on 2 processes; checkpoints (one file each) at step 2."""
    root = tmp_path_factory.mktemp("fsdp2")
    return root, _fit(root, "fsdp2", max_steps=3)


@pytest.fixture(scope="module")
def resumed(sharded):
    """Resumed from step 2's file to step 4, writing distributed-checkpoint folders at step 4."""
    root, _ = sharded
    start = root / "resumed" / "from.ckpt"
    start.parent.mkdir()
    shutil.copy(root / "fsdp2" / "step=000002.ckpt", start)
    return root, _fit(
        root, "resumed", "--trainer.strategy.init_args.save_distributed_checkpoint=true", max_steps=4, ckpt_path=start
    )


# two processes import and build the system on 2 cores: ~30 s idle
def test_two_process_fsdp2_fit_shards_every_parameter_and_keeps_ranks_in_step(sharded):
    _, ranks = sharded
    assert [r["world"] for r in ranks] == [2, 2]
    layout = ranks[0]["layout"]
    assert all(sharded and placements == (("Shard", 0),) for sharded, placements, *_ in layout.values())
    for name, (_, _, local0, numel, _) in layout.items():  # the two shards make the whole parameter
        assert local0 + ranks[1]["layout"][name][2] == numel, name
    held = [sum(r["layout"][n][2] for n in layout) / sum(v[3] for v in layout.values()) for r in ranks]
    assert all(0.45 < share < 0.55 for share in held), held
    layer = "editor.comprehension.llava.base_model.model.model.language_model.layers.0.self_attn.q_proj."
    assert layout[layer + "base_layer.weight"][4] is False and layout[layer + "lora_A.default.weight"][4] is True

    for step in range(3):  # each rank trained on its own shard of the data
        a, b = ranks[0]["sources"][step], ranks[1]["sources"][step]
        assert not any(torch.equal(x, y) for x in a for y in b)
    after = ranks[0]["after"]
    assert after.keys() == ranks[1]["after"].keys() and len(after) > 500
    for name, weight in after.items():
        assert torch.equal(weight, ranks[1]["after"][name]), name
    trainable = {n for n, v in layout.items() if v[4]}
    changed = {n for n, w in after.items() if not torch.equal(w, ranks[0]["before"][n])}
    assert changed <= trainable and len(changed) > 300  # frozen weights (LoRA's base among them) never move
    assert layer + "lora_B.default.weight" in changed


def test_last_checkpoint_is_one_file_of_trained_weights_that_starts_a_non_sharded_system(sharded):
    root, ranks = sharded
    last = _load(root / "fsdp2" / "last.ckpt")
    assert last["global_step"] == 2
    state = last["state_dict"]
    assert set(state) == set(last["insightedit"]["saved"]) and not any("vision_tower" in k for k in state)
    assert all(type(v) is torch.Tensor for v in state.values())  # gathered, not DTensor shards
    trained = ranks[0]["steps"][2]
    assert trained.keys() <= state.keys()
    for name, weight in trained.items():
        assert torch.equal(state[name], weight), name
    assert len(last["optimizer_states"][0]["state"]) == len(trained)

    fresh = _rebuilt(last["hyper_parameters"], root / "fsdp2" / "last.ckpt")
    weights = dict(fresh.named_parameters())
    for name, weight in trained.items():
        assert torch.equal(weights[name], weight), name
    for name, weight in ranks[0]["before"].items():  # and the frozen weights are the run's
        if name not in trained:
            assert torch.equal(weights[name], weight), name


# a two-process `insightedit test` of the sharded checkpoint: test_step -> edit run sharded, rank 0 reports
@pytest.mark.slow  # one more 2-process run; the suite's budget keeps it out of CI
def test_insightedit_test_evaluates_the_checkpoint_sharded(sharded):
    root, _ = sharded
    command = [
        sys.executable,
        "-m",
        "insightedit",
        "test",
        "--config",
        str(root / "fsdp2.yaml"),
        *TWO_PROCESSES[:3],
        "--trainer.limit_test_batches=1",
        "--ckpt_path",
        str(root / "fsdp2" / "last.ckpt"),
    ]
    result = subprocess.run(command, cwd=root, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    # the config names no evaluation.out_dir (and the checkpoint holds no evaluation settings): the log dir
    (path,) = (root / "fsdp2" / "logs").rglob("test_report.json")
    report = json.loads(path.read_text())
    assert set(report["systems"]) == {"this checkpoint", "identity edit"}


@pytest.mark.slow  # one more 2-process run; the suite's budget keeps it out of CI
def test_resuming_from_the_full_file_continues_exactly(sharded, resumed):
    _, straight = sharded
    _, again = resumed
    for rank in (0, 1):  # restored into the shards: the weights of step 2, then the very same step 3
        before, step2 = again[rank]["before"], straight[rank]["steps"][2]
        assert all(torch.equal(before[n], w) for n, w in step2.items())
        step3 = again[rank]["steps"][3]
        assert step3.keys() == straight[rank]["steps"][3].keys()
        for name, weight in straight[rank]["steps"][3].items():
            assert torch.equal(step3[name], weight), name
        assert again[rank]["losses"][3] == straight[rank]["losses"][3]


# one more two-process run, resumed from a folder of shards that holds only the trained weights
@pytest.mark.slow  # one more 2-process run; the suite's budget keeps it out of CI
def test_a_distributed_checkpoint_folder_resumes_and_starts_the_next_stage(resumed):
    root, ranks = resumed
    folder = root / "resumed" / "last.ckpt"
    assert folder.is_dir() and (folder / ".metadata").is_file()
    trained = ranks[0]["steps"][4]
    fresh = _rebuilt(_load(folder / "meta.pt")["hyper_parameters"], folder)
    weights = dict(fresh.named_parameters())
    for name, weight in trained.items():
        assert torch.equal(weights[name], weight), name

    again = _fit(root, "from_folder", max_steps=5, ckpt_path=folder)
    for rank in (0, 1):
        before = again[rank]["before"]
        assert all(torch.equal(before[n], w) for n, w in ranks[rank]["steps"][4].items())
        assert again[rank]["steps"].keys() == {5}
