"""Meta-first loading: under FSDP2 rank 0 alone reads the pretrained weights, and they land in the shards.

Two gloo processes build a tiny InsightEdit whose LLaVA, UNet and trained weights (``init_from``) come
from files, with the loading step deferred (as the CLI does under ``ModelParallelStrategy``); the model
gathered from their shards must equal, value for value, the one a single process builds and loads.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training_runs import environment

from insightedit.models.comprehension.presets import write_tiny_llava
from insightedit.systems.editor_system import EditorSystem
from insightedit.training.sharded_loading import deferred_pretrained_loading, loading_is_deferred, meta_skeleton

RANK_SCRIPT = Path(__file__).with_name("_sharded_loading_rank.py")


def _weights(tmp_path: Path) -> dict:
    """A LLaVA folder, a UNet checkpoint unlike the fresh one and an init_from checkpoint; the system's settings."""
    llava = write_tiny_llava(tmp_path / "tiny-llava")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        donor = EditorSystem(member="insightedit", preset="tiny", stage=3)
        with torch.no_grad():
            for parameter in donor.parameters():
                parameter.add_(torch.randn_like(parameter))
    unet = {f"editor.generation.unet.unet.{k}": v for k, v in donor.editor.generation.unet.unet.state_dict().items()}
    torch.save({"state_dict": unet}, tmp_path / "unet.ckpt")
    bridge = {k: v for k, v in donor.state_dict().items() if k.startswith("editor.bridging.bim.")}
    torch.save({"state_dict": bridge}, tmp_path / "stage2.ckpt")
    return {
        "member": "insightedit",
        "preset": "tiny",
        "stage": 3,
        "comprehension": {"pretrained": str(llava)},
        "generation": {"pretrained": str(tmp_path / "unet.ckpt")},
        "init_from": str(tmp_path / "stage2.ckpt"),
    }


def test_the_cli_defers_loading_only_under_a_model_parallel_strategy():
    from insightedit.lightning_cli import shards_the_model
    from insightedit.training.sharding import FSDP2Strategy

    assert shards_the_model({"class_path": "insightedit.training.sharding.FSDP2Strategy"})
    assert shards_the_model({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": {}})
    assert shards_the_model(FSDP2Strategy())
    assert not shards_the_model({"class_path": "lightning.pytorch.strategies.FSDPStrategy"})  # FSDP1: as before
    assert not any(shards_the_model(s) for s in ("ddp", "auto", None, {"class_path": "no.such.Strategy"}))


def test_the_skeleton_keeps_names_dtypes_flags_and_ties_with_no_memory():
    torch.manual_seed(0)
    system = EditorSystem(member="insightedit", preset="tiny", stage=3)
    system.editor.bridging.half()
    skeleton = meta_skeleton(system.editor)
    ours, theirs = dict(system.editor.named_parameters()), dict(skeleton.named_parameters())
    assert ours.keys() == theirs.keys() and all(p.is_meta for p in theirs.values())
    assert all((p.dtype, p.shape, p.requires_grad) == (ours[n].dtype, ours[n].shape, ours[n].requires_grad)
               for n, p in theirs.items())  # fmt: skip
    assert any(p.dtype == torch.float16 for p in theirs.values())
    assert not any(p.is_meta for p in system.parameters())  # the original is untouched
    models = (system.editor.comprehension, skeleton.comprehension)
    rows = [(m.input_rows.new_rows, m.output_rows.new_rows) for m in models]
    assert (rows[1][0] is rows[1][1]) == (rows[0][0] is rows[0][1])  # tied [MM] rows stay tied (or untied)


def test_deferred_loading_waits_for_finish_loading_and_then_equals_the_usual_build(tmp_path):
    settings = _weights(tmp_path)
    torch.manual_seed(0)
    reference = EditorSystem(**settings)
    torch.manual_seed(0)
    with deferred_pretrained_loading():
        assert loading_is_deferred()
        system = EditorSystem(**settings)
    assert not loading_is_deferred() and system.loading_pending and not system._carried
    torch.randn(1000)  # random draws between build and load do not change what loads
    system.finish_loading()
    assert not system.loading_pending and system._carried == reference._carried
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in system.state_dict().items())
    assert system.trainable_names() == reference.trainable_names()
    system.finish_loading()  # once only


@pytest.mark.slow  # two fresh interpreters build and shard a tiny InsightEdit: about 30 s on a busy machine
def test_two_gloo_ranks_load_into_shards_what_one_process_loads_and_only_rank_0_reads_the_weights(tmp_path):
    settings = _weights(tmp_path)
    weight_files = [str(Path(settings["generation"]["pretrained"])), settings["init_from"]]
    weight_files += [str(p) for p in Path(settings["comprehension"]["pretrained"]).glob("*.safetensors")]
    (tmp_path / "settings.json").write_text(json.dumps({**settings, "weight_files": weight_files}))
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, str(RANK_SCRIPT)]
    args = [str(tmp_path / "store"), str(tmp_path / "settings.json"), str(out)]
    ranks = [subprocess.Popen([*command, str(rank), "2", *args], env=environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]  # fmt: skip
    outputs = [rank.communicate(timeout=600)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]

    torch.manual_seed(0)
    reference = EditorSystem(**settings)
    gathered = torch.load(out / "gathered.pt", weights_only=True)
    expected = dict(reference.named_parameters())
    assert gathered["parameters"].keys() == expected.keys()
    differing = [n for n, v in gathered["parameters"].items() if not torch.equal(v, expected[n])]
    assert differing == []  # values, not shapes: pretrained, init_from, fresh LoRA and [MM] rows alike
    buffers = dict(reference.named_buffers())
    assert gathered["buffers"].keys() == buffers.keys()
    assert all(torch.equal(v, buffers[n]) for n, v in gathered["buffers"].items())

    zero, one = reports
    assert zero["pending"] and one["pending"]  # both built without loading
    assert zero["sharded"] == one["sharded"] == len(expected)  # every parameter is a DTensor shard
    assert zero["meta_left"] == one["meta_left"] == []
    assert zero["trainable"] == one["trainable"] == sorted(reference.trainable_names())
    assert zero["carried"] == one["carried"] == sorted(reference._carried)
    read = {str(Path(p).resolve()) for p in zero["opened"]}
    assert {str(Path(p).resolve()) for p in weight_files if p.endswith(".ckpt")} <= read
    assert one["opened"] == []  # rank 1 read no weight file
    for setting in ("comprehension.pretrained", "generation.pretrained"):  # reported once, by the rank that read
        assert any(line.startswith(f"{setting}: loaded") for line in zero["lines"]), zero["lines"]
    assert one["lines"] == []


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _load_into_shards(system: EditorSystem, mesh) -> None:
    from insightedit.training.sharded_loading import load_into_shards
    from insightedit.training.sharding import shard_system

    shard = lambda: shard_system(system, mesh, system.sharding)  # noqa: E731 - what configure_model passes
    load_into_shards(system, system.finish_loading, shard, state=("_carried",), group_bytes=256 * 1024)


def test_one_rank_loads_into_its_shards_what_one_process_loads(tmp_path, one_rank):
    from torch.distributed.tensor import DTensor

    settings = _weights(tmp_path)
    torch.manual_seed(0)
    reference = EditorSystem(**settings)
    torch.manual_seed(0)
    with deferred_pretrained_loading():
        system = EditorSystem(**settings)
    _load_into_shards(system, one_rank)
    parameters = dict(system.named_parameters())
    assert all(isinstance(p, DTensor) for p in parameters.values())
    expected = dict(reference.named_parameters())
    assert all(torch.equal(p.full_tensor(), expected[n]) for n, p in parameters.items())
    assert system.trainable_names() == reference.trainable_names() and system._carried == reference._carried


def test_a_failed_load_on_rank_0_stops_with_its_one_line(tmp_path, one_rank):
    from insightedit.errors import UserError

    torch.manual_seed(0)
    with deferred_pretrained_loading():
        system = EditorSystem(member="instruct_pix2pix", preset="tiny", stage=3, init_from=str(tmp_path / "no.ckpt"))
    with pytest.raises(UserError, match="init_from: checkpoint .*no.ckpt not found"):
        _load_into_shards(system, one_rank)
