"""Full width on a CPU: the real-format folders (fast, at small widths) and the whole chain (slow, real widths).

The fast tests write :mod:`benchmarks.full_width_folders`' three folders with ``small=True`` (the real
layouts, tokenizers and special ids; narrow towers) and load them with the calls the full preset uses;
the full-width configs are checked without building anything, and the overlay composes and plans with
every member's full yaml. The slow tests run the chain of ``lightning_configs/full_width_cpu.yaml`` from
the folders it writes (reused when stamped) to 512² edits, InsightEdit's three stages and every other member.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import full_width_folders as fw  # noqa: E402

OVERLAY = REPOSITORY / "lightning_configs" / "full_width_cpu.yaml"


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory) -> dict[str, Path]:
    return fw.write_full_width_folders(tmp_path_factory.mktemp("fw"), small=True)


def test_llava_folder_has_llava_hf_layout_and_special_tokens(small_folders):
    from transformers import AutoTokenizer, LlavaConfig

    folder = small_folders[fw.LLAVA_DIR]
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
    } <= names
    shards = sorted(n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert any(n.startswith("chat_template") for n in names)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    assert ids == [0, 1, 2, 32000, 32001] and len(tokenizer) == 32002 and tokenizer.pad_token_id == 32001
    encoded = tokenizer("USER: <image>\nRemove the red circle. ASSISTANT:").input_ids
    assert encoded[0] == 1 and encoded.count(32000) == 1 and 0 not in encoded  # <s> first, no <unk>
    config = LlavaConfig.from_pretrained(folder)
    assert (config.image_token_index, config.pad_token_id, config.text_config.vocab_size) == (32000, 32001, 32064)
    assert config.vision_feature_layer == -2 and config.vision_config.num_hidden_layers >= 2
    assert json.loads((folder / "generation_config.json").read_text())["pad_token_id"] == 32001


def test_instruct_pix2pix_folder_has_the_diffusers_layout_and_clip_tokens(small_folders):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder = small_folders[fw.PIX2PIX_DIR]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    for part, files in {"unet": ("config.json", "diffusion_pytorch_model.safetensors"),
                        "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
                        "text_encoder": ("config.json", "model.safetensors"),
                        "tokenizer": ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"),
                        "scheduler": ("scheduler_config.json",),
                        "feature_extractor": ("preprocessor_config.json",)}.items():  # fmt: skip
        assert all((folder / part / name).is_file() for name in files), part
        assert part in index
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    assert len(tokenizer) == 49408 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and max(ids[1:-1]) < 49406
    assert UNet2DConditionModel.load_config(folder, subfolder="unet")["in_channels"] == 8


def test_iaa_clip_file_loads_through_bridging_clip_pretrained(small_folders):
    from safetensors.torch import load_file

    from insightedit.errors import UserError
    from insightedit.models.bridging.iaa import build_clip_image_encoder

    folder = small_folders[fw.CLIP_DIR]
    config = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    assert config == fw.iaa_clip_config(small=True)
    encoder = build_clip_image_encoder(config, pretrained=str(folder / fw.CLIP_FILE))
    encoder.load_pretrained()
    saved = load_file(str(folder / fw.CLIP_FILE))
    for name, tensor in encoder.visual.state_dict().items():
        assert torch.equal(tensor, saved[f"visual.{name}"]), name
    with pytest.raises(UserError, match="local open_clip checkpoint file"):
        build_clip_image_encoder(config, pretrained="openai")


def test_folders_are_written_once_and_rewritten_when_the_stamp_changes(small_folders, monkeypatch, tmp_path):
    import shutil

    out = tmp_path / "folders"  # a copy: the stand-in writers below would empty the module's shared folders
    shutil.copytree(small_folders[fw.LLAVA_DIR].parent, out)
    copies = {name: out / path.name for name, path in small_folders.items()}
    before = {name: (path / fw.STAMP).stat().st_mtime_ns for name, path in copies.items()}
    fw.write_full_width_folders(out, small=True)  # stamped: nothing rewritten
    assert {name: (path / fw.STAMP).stat().st_mtime_ns for name, path in copies.items()} == before
    calls = []

    def stand_in(path, depths, small):
        calls.append(path)
        path.mkdir(exist_ok=True)

    monkeypatch.setattr(fw, "VERSION", "stale")
    for name in (fw.CLIP_DIR, fw.LLAVA_DIR, fw.PIX2PIX_DIR):
        monkeypatch.setitem(fw.WRITERS, name, stand_in)
    fw.write_full_width_folders(out, small=True)
    assert len(calls) == 3 and not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_full_width_configs_keep_every_real_width():
    llava = fw.llava_config()
    text, vision = llava.text_config, llava.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads) == (4096, 11008, 32)
    assert text.vocab_size == 32064
    assert (vision.hidden_size, vision.image_size, vision.patch_size, vision.num_attention_heads) == (1024, 336, 14, 16)
    assert (text.num_hidden_layers, vision.num_hidden_layers) == (2, 3)
    unet = fw.unet_config()
    assert tuple(unet["block_out_channels"]) == (320, 640, 1280, 1280)
    assert (unet["in_channels"], unet["cross_attention_dim"], unet["layers_per_block"]) == (8, 768, 1)
    assert tuple(fw.vae_config()["block_out_channels"]) == (128, 256, 512, 512)
    assert fw.text_encoder_config()["hidden_size"] == 768
    clip = fw.iaa_clip_config()
    assert (clip["embed_dim"], clip["vision_cfg"]["width"], clip["vision_cfg"]["patch_size"]) == (768, 1024, 14)


def test_overlay_names_the_folders_the_script_writes_by_default():
    init_args = yaml.safe_load(OVERLAY.read_text())["model"]["init_args"]
    assert not {"comprehension", "bridging", "generation", "head"} & set(init_args)  # every member reads the overlay
    overlay = init_args["section_overrides"]
    assert overlay["comprehension"]["pretrained"] == (fw.DEFAULT_OUT / fw.LLAVA_DIR).as_posix()
    assert overlay["generation"]["pretrained"] == (fw.DEFAULT_OUT / fw.PIX2PIX_DIR).as_posix()
    assert overlay["bridging"]["clip_pretrained"] == (fw.DEFAULT_OUT / fw.CLIP_DIR / fw.CLIP_FILE).as_posix()
    assert overlay["bridging"]["clip_model"] == fw.iaa_clip_config()  # the folder's open_clip_config.json


MEMBER_CONFIGS = ("instruct_pix2pix", "mgie", "smartedit", "insightedit_no_iaa", "insightedit_no_bim", "stage3")


@pytest.mark.parametrize("name", MEMBER_CONFIGS)
def test_overlay_composes_with_every_members_full_yaml(name, small_folders):
    """Each member's yaml + the overlay: the member's sections get the folders, parts it lacks are skipped."""
    from insightedit.commands.plan import build_on_meta, planned_config
    from insightedit.models.zoo import SECTIONS, get_member, resolve_section_overrides
    from insightedit.training.composition import merge_config_files

    raw = merge_config_files([f"lightning_configs/{name}.yaml", str(OVERLAY)])["model"]["init_args"]
    member = get_member(raw["member"])
    resolved = resolve_section_overrides(raw)
    overrides = raw["section_overrides"]
    assert "section_overrides" not in resolved
    for section in SECTIONS:
        if section in member.sections and section in overrides:
            for key, value in overrides[section].items():
                assert resolved[section][key] == value, (section, key)
            kept = {k: v for k, v in (raw.get(section) or {}).items() if k not in overrides[section]}
            assert kept.items() <= resolved[section].items()  # the member's own settings stay (LoRA, sizes...)
        elif section not in member.sections:
            assert not resolved.get(section), section  # skipped: build_editor would refuse it
    # plan builds it on meta from the folders' configs (the small ones here: same layout, no weights read)
    config = planned_config([f"lightning_configs/{name}.yaml", str(OVERLAY)])
    init_args = config["model"]["init_args"]
    assert "section_overrides" not in init_args
    local = {"comprehension": ("pretrained", fw.LLAVA_DIR), "generation": ("pretrained", fw.PIX2PIX_DIR),
             "bridging": ("clip_pretrained", fw.CLIP_DIR)}  # fmt: skip
    for section, (key, folder) in local.items():
        if section in member.sections:
            path = small_folders[folder] / fw.CLIP_FILE if section == "bridging" else small_folders[folder]
            init_args[section][key] = str(path)
            if section == "bridging":
                init_args[section]["clip_model"] = fw.iaa_clip_config(small=True)
    system, named, _ = build_on_meta(config["model"])
    assert set(named) == {f"{s}.{local[s][0]}" for s in local if s in member.sections}
    assert all(p.device.type == "meta" for p in system.parameters())
    if system.editor.mllm is not None:
        assert system.editor.mllm.base_model.config.text_config.vocab_size == 32064  # the folder's config, read


def test_section_overrides_are_saved_merged_and_refused_when_misnamed():
    """What is saved is what was built: the hyperparameters hold the merged sections, no section_overrides."""
    from insightedit.errors import UserError
    from insightedit.models.zoo import apply_section_overrides
    from insightedit.systems.editor_system import EditorSystem

    overrides = {"comprehension": {"lora_rank": 2}, "generation": {"prediction_type": "v_prediction"}}
    system = EditorSystem(member="instruct_pix2pix", preset="tiny", section_overrides=overrides)
    assert "section_overrides" not in system.hparams or system.hparams["section_overrides"] is None
    assert system.hparams["comprehension"] is None  # InstructPix2Pix has no MLLM: skipped
    assert system.hparams["generation"] == {"prediction_type": "v_prediction"}
    assert system.editor.generation.noise_scheduler.config.prediction_type == "v_prediction"
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    given = {"member": "instruct_pix2pix", "preset": "tiny", "section_overrides": overrides}
    with _given_hyperparameters_context(given, "lightning.pytorch.cli.instantiate_module"):  # as LightningCLI builds
        from_cli = EditorSystem(**given)
    assert from_cli.hparams["generation"] == system.hparams["generation"] and not from_cli.hparams["section_overrides"]
    again = EditorSystem(**system.hparams)  # a checkpoint's hyperparameters rebuild the same system
    assert {n: p.shape for n, p in again.named_parameters()} == {n: p.shape for n, p in system.named_parameters()}
    with pytest.raises(UserError, match="has no comprehension section"):  # given directly: still refused
        EditorSystem(member="instruct_pix2pix", preset="tiny", comprehension={"lora_rank": 2})
    with pytest.raises(UserError, match="section_overrides has no section heads"):
        apply_section_overrides("mgie", {}, {"heads": {"width": 8}})
    merged = apply_section_overrides("mgie", {"comprehension": {"lora_rank": 8, "dtype": "bfloat16"}},
                                     {"comprehension": {"dtype": "float32"}, "bridging": {"x": 1}})  # fmt: skip
    assert merged["comprehension"] == {"lora_rank": 8, "dtype": "float32"} and not merged.get("bridging")


# ---------------------------------------------------------------- the chain at real widths (slow)


@pytest.mark.slow
@pytest.mark.timeout(7200)  # ~35-60 min on 2 cores (the project's 600 s limit is for ordinary tests)
def test_full_width_chain_and_every_member_train_export_and_edit(tmp_path):
    """benchmarks/full_width.py's whole run: fit stages 1, 2, 3 (each from the last) -> test 2 pairs -> export ->
    a 512² edit per memory mode, 4-bit and 8-bit (the CLI's --4bit / --8bit) included; then every other member's
    full yaml + the overlay: fit 2 steps (its stage as written, from the folders), export, a 512² edit.

    The measurements go to ``$INSIGHTEDIT_FULL_WIDTH_RESULTS`` (``.json`` / ``.md``) when it is set, so one run
    both checks the chain and gives benchmarks/results/full_width.*.
    """
    import full_width
    from PIL import Image

    report = full_width.measure(tmp_path / "runs", list(full_width.MODES), list(full_width.OTHER_MEMBERS))
    keep = os.environ.get("INSIGHTEDIT_FULL_WIDTH_RESULTS")
    if keep:
        Path(keep).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        Path(keep).with_suffix(".md").write_text(full_width.markdown(report))
    for stage in report["stages"]:
        assert len(stage["losses"]) >= 2 and all(math.isfinite(v) for v in stage["losses"]), stage
        assert stage["checkpoint"] and stage["init_from_loaded"], stage
    assert report["test_edits_written"] == 2, report["test_out_tail"]  # the test printed "edits:  2 PNGs ..."
    assert report["test_report"]["systems"]["this checkpoint"]["all"]["n"] == 2, report["test_report"]
    assert [edit["mode"] for edit in report["edits"]] == ["full", "low", "sequential", "4bit", "8bit"]
    assert all(edit["size"] == [512, 512] for edit in report["edits"]), report["edits"]
    assert [member["member"] for member in report["members"]] == list(OTHER_MEMBERS)
    for member in report["members"]:
        assert len(member["losses"]) >= 2 and all(math.isfinite(v) for v in member["losses"]), member
        loads = " ".join(member["loads"])
        assert "generation.pretrained: loaded" in loads and fw.PIX2PIX_DIR in loads, member  # the folder, no hub id
        assert ("comprehension.pretrained: loaded" in loads) == (member["member"] != "instruct_pix2pix"), member
        assert member["edit"]["size"] == [512, 512], member
    import bitsandbytes as bnb

    from insightedit.pipeline import EditPipeline

    photo = Image.open(report["photo"])
    for quantization, layer in (("4bit", bnb.nn.Linear4bit), ("8bit", bnb.nn.Linear8bitLt)):  # the API takes both
        pipeline = EditPipeline.from_pretrained(report["model"], device="cpu", quantization=quantization,
                                                memory_mode="low")  # fmt: skip
        quantized = [m for m in pipeline.editor.mllm.modules() if isinstance(m, layer)]
        assert len(quantized) >= 7 * fw.FULL_DEPTHS.llm_layers  # q, k, v, o, gate, up, down of every LLM layer
        result = pipeline(photo, "remove the red square", num_inference_steps=2, seed=0)
        assert result.images[0].size == (512, 512)
        del pipeline


OTHER_MEMBERS = ("instruct_pix2pix", "mgie", "smartedit", "insightedit_no_iaa", "insightedit_no_bim")


def test_edits_written_reads_the_test_commands_count_wherever_it_stands():
    """The chain's ``test`` check reads the count from the whole output (W&B's exit lines come after it)."""
    import full_width

    out = "edits:  2 PNGs of this checkpoint in runs/stage3/edits (...)\nW&B run: ...\n" + "wandb: sync ...\n" * 40
    assert full_width.edits_written(out) == 2
    assert full_width.edits_written("metrics: runs/stage3/test_report.json") is None
