"""Constructors build, loading is a separate step: named weights are read by ``load_pretrained`` only."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from insightedit.models.loading import load_pretrained, pending_parts
from insightedit.models.loads import LOADS_LOGGER
from insightedit.models.zoo import build_editor

REPO = Path(__file__).resolve().parents[1]
FULL_CONFIGS = ("instruct_pix2pix.yaml", "mgie.yaml", "smartedit.yaml", "insightedit_no_iaa.yaml",
                "insightedit_no_bim.yaml", "stage3.yaml")  # fmt: skip

# Run with an empty hub cache, downloads off and every socket refused: a weight read or a hub request
# during construction would raise; the load step must raise the one-line missing-weights error.
FULL_BUILDS = """
import json, socket, sys
from pathlib import Path

def refused(*args, **kwargs):
    raise OSError("a network connection was attempted")

socket.socket.connect = refused
import torch
from insightedit.errors import UserError
from insightedit.models.loading import pending_parts
from insightedit.models.zoo import build_editor
from insightedit.training.composition import load_yaml

results = {}
for config in sys.argv[2:]:
    args = load_yaml(Path(sys.argv[1]) / config)["model"]["init_args"]
    sections = {name: args.get(name) for name in ("comprehension", "bridging", "generation", "head")}
    bare = {name: {k: v for k, v in (s or {}).items() if "pretrained" not in k} for name, s in sections.items()}
    with torch.device("meta"):
        editor = build_editor(args["member"], args["preset"], sections, align_target=args.get("align_target"))
        compared = config in ("stage3.yaml", "mgie.yaml")  # every kind of part, in two builds
        member, preset, target = args["member"], args["preset"], args.get("align_target")
        reference = build_editor(member, preset, bare, align_target=target) if compared else None
    shapes = lambda m: {n: tuple(p.shape) for n, p in [*m.named_parameters(), *m.named_buffers()]}
    results[config] = {
        "pending": sorted(pending_parts(editor)),
        "real": [n for n, p in editor.named_parameters() if not p.is_meta],
        "same_as_unnamed": None if reference is None else shapes(editor) == shapes(reference),
        "parameters": sum(p.numel() for p in editor.parameters()),
    }
try:
    editor.load_pretrained()
    results["load"] = "loaded"
except UserError as error:
    results["load"] = str(error)
print(json.dumps(results))
"""


@pytest.mark.slow  # about 20 s: a fresh interpreter builds six full-size editors on meta
def test_full_presets_build_on_meta_without_weights_or_hub_and_the_load_step_says_what_is_missing(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "offline",
           "INSIGHTEDIT_CACHE": str(tmp_path / "cache")}  # fmt: skip
    command = [sys.executable, "-c", FULL_BUILDS, str(REPO / "lightning_configs"), *FULL_CONFIGS]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {
        "instruct_pix2pix.yaml": ["generation"],
        "mgie.yaml": ["comprehension", "generation"],
        "smartedit.yaml": ["comprehension", "generation"],
        "insightedit_no_iaa.yaml": ["comprehension", "generation"],
        "insightedit_no_bim.yaml": ["bridging.clip_image_encoder", "comprehension", "generation"],
        "stage3.yaml": ["bridging.clip_image_encoder", "comprehension", "generation"],
    }
    for config, pending in expected.items():
        built = results[config]
        assert built["pending"] == pending, config  # every named weight waits for the load step
        assert built["real"] == [], config  # nothing materialised: all on meta
        assert built["same_as_unnamed"] in (None, True), config  # the names and shapes of the build naming none
    assert results["stage3.yaml"]["same_as_unnamed"] and results["mgie.yaml"]["same_as_unnamed"]
    assert results["stage3.yaml"]["parameters"] > 8_000_000_000  # the full-size model, not a stand-in
    load = results["load"]  # stage3's comprehension loads first: the one-line missing-weights error
    assert load.startswith("weights not on this machine") and "llava-hf/llava-1.5-7b-hf" in load, load


def _stand_in_unet_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A tiny UNet unlike the fresh one (another seed), saved as an EditorSystem checkpoint would hold it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        unet = build_editor("instruct_pix2pix", "tiny").generation.unet.unet
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.add_(torch.randn_like(parameter))
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.save({"state_dict": {f"editor.generation.unet.unet.{k}": v for k, v in state.items()}}, path)
    return state


def test_tiny_generation_pretrained_is_fresh_until_the_load_step_then_the_checkpoints_tensors(tmp_path, caplog):
    path = tmp_path / "stand_in.ckpt"
    saved = _stand_in_unet_checkpoint(path)
    caplog.set_level(logging.INFO, logger=LOADS_LOGGER)
    fresh = build_editor("insightedit", "tiny").generation.unet.unet.state_dict()
    editor = build_editor("insightedit", "tiny", {"generation": {"pretrained": str(path)}})
    assert caplog.messages == [] and sorted(pending_parts(editor)) == ["generation"]
    unet = editor.generation.unet.unet
    built = unet.state_dict()
    assert built.keys() == fresh.keys()
    assert all(torch.equal(built[k], fresh[k]) for k in fresh)  # fresh init, the checkpoint not read
    assert not any(torch.equal(built[k], saved[k]) for k in saved if saved[k].numel() > 1)

    assert editor.load_pretrained() == ["generation"]
    loaded = unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())  # every UNet tensor is the checkpoint's
    branch = {k: v for k, v in loaded.items() if k not in saved}  # the image branch: from the loaded to_k / to_v
    assert branch and all(".processor." in k for k in branch)
    for name, value in branch.items():
        text = name.replace("processor.to_k_ip.0", "to_k").replace("processor.to_v_ip.0", "to_v")
        assert torch.equal(value, loaded[text]), name
    assert caplog.messages == [f"generation.pretrained: loaded {len(saved)} tensors from {path} (the UNet)"]
    assert load_pretrained(editor) == [] and len(caplog.messages) == 1  # loaded once


def test_a_diffusers_folder_gives_the_architecture_at_build_and_its_weights_at_the_load_step(tmp_path):
    from insightedit.models.generation.edit_unet import EDIT_UNET_CONFIG
    from insightedit.models.generation.generator import EditGenerator

    sizes = {"generation": {"unet_config": {"block_out_channels": [32, 64]}}}  # not the preset's: read from the folder
    source = build_editor("instruct_pix2pix", "tiny", sizes)
    with torch.no_grad():
        for parameter in source.generation.unet.parameters():
            parameter.add_(1.0)
        for parameter in source.generation.text_encoder.parameters():
            parameter.mul_(1.5)
    source.generation.save_pretrained(tmp_path)
    (tmp_path / EDIT_UNET_CONFIG).unlink()  # a plain diffusers layout (unet/, scheduler/, text_encoder/...)
    generator = EditGenerator("tiny", pretrained=str(tmp_path), latent="pixel_unshuffle")  # tiny sizes otherwise
    saved = source.generation.unet.unet.state_dict()
    built = generator.unet.unet.state_dict()
    assert list(generator.unet.unet.config.block_out_channels) == [32, 64]  # read from unet/config.json
    assert not torch.equal(built["conv_in.weight"], saved["conv_in.weight"])  # no weight read yet
    generator.load_pretrained()
    loaded = generator.unet.unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    ip = {k: v for k, v in loaded.items() if k.endswith("to_k_ip.0.weight")}
    assert ip and all(torch.equal(v, loaded[k.replace("processor.to_k_ip.0", "to_k")]) for k, v in ip.items())
    null = source.generation.encode_text([""])  # the folder's text encoder and tokenizer, read at the load step
    assert not torch.equal(null, source.generation.null_f_txt) and torch.equal(generator.null_f_txt, null)


def test_a_tokenizer_read_only_with_the_weights_gives_the_same_model(tmp_path, monkeypatch):
    """A hub id not on this machine: built with no tokenizer, [MM0] placed after the vocabulary, checked at load."""
    from transformers import AutoTokenizer

    from insightedit.models.comprehension.presets import build_comprehension, write_tiny_llava

    folder = write_tiny_llava(tmp_path / "tiny-llava")
    reference = build_comprehension("tiny").eval()
    reading = AutoTokenizer.from_pretrained

    def no_local_tokenizer(*args, **kwargs):
        if kwargs.get("local_files_only"):
            raise OSError("not on this machine")
        return reading(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_local_tokenizer)
    model = build_comprehension("tiny", pretrained=str(folder))
    assert model.tokenizer is None and model.first_mm_id == reference.first_mm_id
    model.load_pretrained()
    model.eval()
    pixels = torch.rand(2, 3, 32, 32)
    instructions = ["remove the red circle", "add a blue square"]
    with torch.no_grad():
        assert torch.equal(model(pixels, instructions).h, reference(pixels, instructions).h)
