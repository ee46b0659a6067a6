"""Inference for every member of the zoo: checkpoint → ``insightedit export`` → ``EditPipeline`` / ``insightedit edit``.

Each member's tiny system (its trainable parts moved off their initial values, as training leaves them)
is saved as a checkpoint, exported, loaded back and made to edit; the pixels must be those of
``system.edit`` on the same image, instruction and seed.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from insightedit.cli import main
from insightedit.errors import UserError
from insightedit.models.zoo import MEMBERS
from insightedit.pipeline import EditPipeline, parts
from insightedit.pipeline.images import mllm_view, read_image
from insightedit.systems.editor_system import EditorSystem

INSTRUCTION = "remove the red circle"
STEPS = 2
SEED = 3
HAS_MGIE = importlib.util.find_spec("insightedit.models.members.mgie") is not None


def member_params() -> list:
    skip = pytest.mark.skipif(not HAS_MGIE, reason="insightedit/models/members/mgie.py is not written yet")
    return [pytest.param(name, marks=skip) if name == "mgie" else name for name in MEMBERS]


def tiny_system(member: str) -> EditorSystem:
    """The member's tiny system built after seed 0 (as export rebuilds it), trained parts perturbed."""
    torch.manual_seed(0)
    system = EditorSystem(member=member, preset="tiny", stage=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for group in system.editor.parameter_groups().values():
            for parameter in group:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=g))
    return system.eval()


def save_checkpoint(system: EditorSystem, path: Path) -> Path:
    """What a Lightning checkpoint of the system holds (the system's own filter of what it keeps)."""
    checkpoint = {
        "state_dict": system.state_dict(),
        "hyper_parameters": dict(system.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    system.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def source_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("source") / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


EXPORTS: dict[str, tuple[EditorSystem, Path]] = {}


def export_member(member: str, tmp_path_factory) -> tuple[EditorSystem, Path]:
    """The member's tiny system and its folder, written by ``insightedit export`` from a checkpoint (once)."""
    if member not in EXPORTS:
        root = tmp_path_factory.mktemp(member)
        system = tiny_system(member)
        checkpoint = save_checkpoint(system, root / "last.ckpt")
        folder = root / "model"
        assert main(["export", "--ckpt_path", str(checkpoint), "--out", str(folder)]) == 0
        EXPORTS[member] = (system, folder)
    return EXPORTS[member]


@pytest.fixture(scope="module", params=member_params())
def exported(request, tmp_path_factory):
    """(member, system, exported folder) for each member."""
    return (request.param, *export_member(request.param, tmp_path_factory))


def reference_edit(system: EditorSystem, image: torch.Tensor) -> torch.Tensor:
    """``system.edit`` on a unit image (3, H, W), as the pipeline feeds it; back in [0, 1]."""
    editor = system.editor
    view = mllm_view(image, editor.mllm_image_size())[None] if editor.needs_mllm_view() else None
    edited = system.edit(
        image[None] * 2 - 1,
        view,
        [INSTRUCTION],
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(SEED),
    )
    return ((edited[0].float() + 1) / 2).clamp(0, 1)


def test_exported_member_edits_as_the_system_and_from_the_command_line(exported, source_png, tmp_path, capsys):
    member, system, folder = exported
    index = json.loads((folder / "model_index.json").read_text())
    assert (index["_class_name"], index["format_version"], index["member"], index["preset"]) == (
        "EditPipeline", 2, member, "tiny",
    )  # fmt: skip
    assert index["options"] == system.editor.options()
    kinds = {name: entry["kind"] for name, entry in index["parts"].items()}
    assert set(kinds) == set(system.editor.parts())
    assert kinds["generation"] == "generation"
    for name, entry in index["parts"].items():
        assert (folder / entry["folder"]).is_dir(), name

    pipeline = EditPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    assert type(pipeline.editor) is type(system.editor) and pipeline.member == member
    image = read_image(source_png)
    unit = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    got = pipeline(image, INSTRUCTION, seed=SEED, num_inference_steps=STEPS, output_type="pt").images[0]
    torch.testing.assert_close(got, reference_edit(system, unit), atol=1e-5, rtol=0)

    out = tmp_path / "edited.png"
    argv = ["edit", "--model", str(folder), "--image", str(source_png), "--instruction", INSTRUCTION, "--out", str(out),
            "--steps", str(STEPS), "--seed", str(SEED), "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    expected = (got * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(out)), expected)


def test_every_member_edits_the_same_in_every_memory_mode(exported):
    """Each memory mode edits as ``full`` does, bit for bit (tolerance 0) on the CPU, switching back and forth.

    On the CPU ``low`` moves nothing and ``sequential`` runs accelerate's hooks with ``cpu`` as the
    execution device (the MLLM's parameters ``meta`` between forwards, each block's weights set from the CPU
    state dict just before it runs), so any difference would be a part read outside its hooked forward (as
    MGIE's visual-token rows once were). Members with an MLLM stream it; the others install no hooks.
    """
    member, system, folder = exported
    pipeline = EditPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))
    kwargs = dict(seed=SEED, num_inference_steps=STEPS, output_type="pt")
    full = pipeline(image, INSTRUCTION, **kwargs).images[0]
    torch.testing.assert_close(full, reference_edit(system, image), atol=1e-5, rtol=0)
    for mode in ("low", "sequential", "full"):
        pipeline.set_memory_mode(mode)
        streams = mode == "sequential" and pipeline.mllm is not None
        assert pipeline.memory_mode == mode and (pipeline.offload is not None) == streams
        if streams:
            assert {p.device.type for p in pipeline.mllm.parameters()} == {"meta"}
        edited = pipeline(image, INSTRUCTION, **kwargs).images[0]
        assert torch.equal(edited, full), (member, mode, (edited - full).abs().max())


def test_the_memory_modes_of_a_member_without_an_mllm(tmp_path_factory):
    """InstructPix2Pix has nothing to stream: sequential installs no hooks and edits as full; 4 bit is refused."""
    system, folder = export_member("instruct_pix2pix", tmp_path_factory)
    pipeline = EditPipeline.from_system(system)
    assert pipeline.mllm is None and not pipeline.has_image_branch
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(seed=SEED, num_inference_steps=STEPS, output_type="pt")
    pipeline.set_memory_mode("sequential")
    assert pipeline.memory_mode == "sequential" and pipeline.offload is None and pipeline.low_memory
    edited = pipeline(image, INSTRUCTION, image_scale=2.0, **kwargs).images[0]  # λ: there is no image branch
    torch.testing.assert_close(edited, reference_edit(system, image), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="4-bit quantization applies to an MLLM; member instruct_pix2pix has none"):
        EditPipeline.from_pretrained(folder, device="cpu", quantization="4bit")


def test_a_version_1_folder_loads_as_insightedit(tmp_path, tmp_path_factory):
    """Folders written before the zoo (InsightEditPipeline, format 1, no member) still load and edit the same."""
    system, folder = export_member("insightedit", tmp_path_factory)
    legacy = tmp_path / "v1"
    shutil.copytree(folder, legacy)
    index = json.loads((folder / "model_index.json").read_text())
    comprehension = {key: index["parts"]["comprehension"][key] for key in ("base", "base_included", "num_mm_tokens")}
    v1 = {"_class_name": "InsightEditPipeline", "format_version": 1, "preset": "tiny", "resolution": 32,
          "comprehension": comprehension, "bridging": {"folder": "bridging"},
          "generation": {"folder": "generation"}}  # fmt: skip
    (legacy / "model_index.json").write_text(json.dumps(v1))
    bridge = json.loads((legacy / "bridging" / "config.json").read_text())
    kept = {key: bridge[key] for key in ("sizes", "num_queries", "use_bim")}
    (legacy / "bridging" / "config.json").write_text(json.dumps(kept))
    loaded = EditPipeline.from_pretrained(legacy, device="cpu", dtype="float32")
    assert loaded.member == "insightedit" and loaded.editor.options() == {"align_target": "plain_instruction"}
    assert loaded.resolution == 32
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    edited = loaded(image, INSTRUCTION, seed=SEED, num_inference_steps=STEPS, output_type="pt").images[0]
    torch.testing.assert_close(edited, reference_edit(system, image), atol=1e-5, rtol=0)


class Head(nn.Module):
    """A part of no known kind, like MGIE's edit head: rebuilt from ``get_config()``; a buffer outside its state."""

    def __init__(self, width: int, queries: int) -> None:
        super().__init__()
        self.width, self.queries = width, queries
        self.proj = nn.Linear(width, width)
        self.queries_embed = nn.Parameter(torch.randn(queries, width))
        self.register_buffer("scale", torch.full((width,), 2.0), persistent=False)

    def get_config(self) -> dict:
        return {"width": self.width, "queries": self.queries}


def test_a_part_of_no_known_kind_round_trips_and_names_only_package_classes(tmp_path, monkeypatch):
    head = Head(8, 3)
    assert parts.part_kind(head) == "module"
    entry = parts.save_part("module", head, tmp_path, "head", None)
    assert entry == {"kind": "module", "folder": "head", "class": f"{__name__}:Head"}
    with pytest.raises(UserError, match="only insightedit.models classes are loaded"):
        parts.load_part(tmp_path, entry, torch.float32)  # this class lives outside the package
    monkeypatch.setattr(parts, "MODULE_PACKAGE", __name__)
    loaded = parts.load_part(tmp_path, entry, torch.float32)
    assert isinstance(loaded, Head) and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), head.state_dict().values(), strict=True))
    assert torch.equal(loaded.scale, head.scale)  # built again on the CPU: no meta tensor left
    with pytest.raises(TypeError, match="give it get_config"):
        parts.save_part("module", nn.Linear(2, 2), tmp_path, "linear", None)


@pytest.mark.parametrize(
    "reference", ["os:system", "builtins:eval", "insightedit.models.zoo:get_member", "insightedit.models.zoo:nothing"]
)
def test_a_folder_cannot_name_code_to_run(reference):
    with pytest.raises(UserError, match="a model part names"):
        parts.module_class(reference)


def test_bad_indexes_are_one_line(tmp_path):
    from insightedit.pipeline.folder import read_model_index

    def index_with(**changes):
        parts = {"generation": {"kind": "generation", "folder": "g"}}
        index = {"_class_name": "EditPipeline", "format_version": 2, "member": "instruct_pix2pix", "preset": "tiny",
                 "resolution": None, "options": {}, "parts": parts}  # fmt: skip
        index.update(changes)
        (tmp_path / "model_index.json").write_text(json.dumps(index))

    cases = [
        (dict(format_version=3), "format version 3, this code reads 1 and 2"),
        (dict(member="pix2pix_zero"), "unknown member 'pix2pix_zero'"),
        (dict(options={"align_target": "instruction"}), "member instruct_pix2pix takes no option align_target"),
        (dict(parts={"generation": {"kind": "pickle", "folder": "g"}}), "part 'generation' has no known kind"),
        (dict(parts={"generation": {"kind": "generation", "folder": "../g"}}), "a part's folder is a plain name"),
        (
            dict(parts={"generation": {"kind": "generation", "folder": "g"}}),
            "is missing: the model folder is incomplete",
        ),
    ]
    for changes, message in cases:
        index_with(**changes)
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            read_model_index(tmp_path)
