"""The sequential memory mode: the MLLM streamed block by block through accelerate's hooks.

On the CPU the hooks run their real code path (weights kept in one CPU state dict, the module's parameters
``meta`` between forwards, each block's weights set from that dict just before it runs and dropped after),
with ``cpu`` as the execution device, so no bytes cross a bus: what a GPU run must still confirm is the
peak (``torch.cuda.max_memory_allocated``) and the seconds the copies add.
"""

import pytest
import torch
from torch import nn

from insightedit.cli import main
from insightedit.errors import UserError
from insightedit.pipeline import EditPipeline
from insightedit.pipeline.offload import SequentialOffload, hooked_block_names, offload_blocks
from insightedit.systems.editor_system import EditorSystem

INSTRUCTION = "remove the red circle"


@pytest.fixture(scope="module")
def pipe() -> EditPipeline:
    torch.manual_seed(0)
    system = EditorSystem(member="insightedit", preset="tiny", stage=3).eval()
    editor = system.editor
    with torch.no_grad():  # off zero, as training leaves them: the BIM and image branch then matter
        g = torch.Generator().manual_seed(1)
        for parameter in list(editor.bridging.bim.parameters()) + list(
            editor.generation.unet.image_branch_parameters()
        ):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=g))
    return EditPipeline.from_system(system, resolution=32)


def conditions(pipe: EditPipeline, image: torch.Tensor) -> list[torch.Tensor]:
    """The member's conditions for one image (f_txt, v_txt, IAA embedding)."""
    found = pipe.conditions([image], [INSTRUCTION], (16, 16))
    return [found.f_txt, found.v_txt, found.image_embeds]


def edit(pipe: EditPipeline, image: torch.Tensor) -> torch.Tensor:
    return pipe(image, INSTRUCTION, seed=3, num_inference_steps=2, text_guidance=3.0, output_type="pt").images[0]


def no_hooks_left(module: nn.Module) -> bool:
    return all(
        not hasattr(m, "_hf_hook") and not hasattr(m, "_old_forward") and "forward" not in vars(m)
        for m in module.modules()
    )


def test_sequential_edit_equals_the_full_edit_bit_for_bit_and_the_hooks_come_off(pipe):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = {name: tensor.clone() for name, tensor in pipe.mllm.state_dict().items()}
    full = edit(pipe, image)
    understood = conditions(pipe, image)

    pipe.set_memory_mode("sequential")
    assert pipe.memory_mode == "sequential" and pipe.low_memory
    mllm = pipe.mllm
    assert {p.device.type for p in mllm.parameters()} == {"meta"}  # the real weights are the hooks'
    blocks = offload_blocks(mllm)
    assert hooked_block_names(mllm) == [block.name for block in blocks]  # the planner lists what is installed
    whole = {block.name.rsplit(".", 2)[-2] for block in blocks if block.whole}
    assert whole == {"layers", "vision_tower"}  # decoder and encoder layers (LoRA inside) and CLIP's embeddings
    decoder = [b for b in blocks if b.whole and ".language_model.layers." in b.name]
    assert len(decoder) == mllm.base_model.config.text_config.num_hidden_layers
    assert any("lora_A" in name for name, _ in decoder[0].module.named_parameters())

    streamed = edit(pipe, image)
    again = conditions(pipe, image)
    assert torch.equal(streamed, full)
    assert all(torch.equal(a, b) for a, b in zip(again, understood, strict=True))
    assert {p.device.type for p in mllm.parameters()} == {"meta"}  # dropped again after the forward

    pipe.set_memory_mode("full")
    assert pipe.offload is None and no_hooks_left(mllm)
    after = mllm.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) and after[name].device.type == "cpu" for name in before)
    assert torch.equal(edit(pipe, image), full)


def test_the_offload_keeps_tied_weights_tied():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    model = Tied()
    ids = torch.tensor([[1, 2, 3]])
    expected = model(ids)
    offload = SequentialOffload(model, torch.device("cpu"))
    assert model.embed.weight.device.type == "meta" and not offload.pinned
    assert torch.equal(model(ids), expected)
    offload.remove()
    assert model.head.weight is model.embed.weight and model.head.weight.device.type == "cpu"
    assert no_hooks_left(model) and torch.equal(model(ids), expected)
    offload.remove()  # twice is harmless


def test_sequential_from_a_folder_saves_and_refuses_the_4bit_mllm(tmp_path, pipe):
    folder = pipe.save_pretrained(tmp_path / "model")
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    resident = EditPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    loaded = EditPipeline.from_pretrained(folder, device="cpu", dtype="float32", memory_mode="sequential")
    assert resident.memory_mode == "full" and resident.offload is None
    assert loaded.memory_mode == "sequential" and loaded.offload is not None
    assert torch.equal(edit(loaded, image), edit(resident, image))
    loaded.save_pretrained(tmp_path / "again")  # writes the real weights, then streams again
    assert loaded.offload is not None and {p.device.type for p in loaded.mllm.parameters()} == {"meta"}
    assert (tmp_path / "again" / "comprehension" / "adapter" / "mm_embeddings.safetensors").is_file()
    with pytest.raises(UserError, match="16-bit"):
        EditPipeline.from_pretrained(folder, device="cpu", quantization="4bit", memory_mode="sequential")
    with pytest.raises(UserError, match="unknown memory mode"):
        EditPipeline.from_pretrained(folder, device="cpu", memory_mode="tiny")


def test_edit_command_memory_flags(tmp_path, capsys):
    from insightedit.commands.edit import MEMORY_MODE_NAMES, build_parser
    from insightedit.pipeline.pipeline import MEMORY_MODES

    assert MEMORY_MODE_NAMES == MEMORY_MODES
    required = ["--model", "m", "--image", "i.png", "--instruction", "x", "--out", "o.png"]
    parser = build_parser()
    assert parser.parse_args(required).memory == "full"
    assert parser.parse_args([*required, "--low-memory"]).memory == "low"
    assert parser.parse_args([*required, "--memory", "sequential"]).memory == "sequential"
    with pytest.raises(UserError, match="not allowed with argument"):  # one line, not usage + exit
        parser.parse_args([*required, "--memory", "sequential", "--low-memory"])
    capsys.readouterr()
    args = ["edit", "--model", str(tmp_path), "--image", str(tmp_path / "a.png"), "--instruction", "x",
            "--out", str(tmp_path / "o.png"), "--memory", "sequential", "--4bit"]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.strip().startswith("error: --memory sequential streams the 16-bit MLLM")
