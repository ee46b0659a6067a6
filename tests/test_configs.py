"""Every shipped yaml parses and instantiates (tiny ones built, full-size ones on meta); tiny fits run."""

import contextlib
import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from omegaconf import OmegaConf

from insightedit.cli import main
from insightedit.data.build.config import config_from_dict, load_config
from insightedit.errors import UserError
from insightedit.lightning_cli import InsightEditCLI
from insightedit.models.zoo import MEMBERS, get_member
from insightedit.systems.editor_system import EditorSystem
from insightedit.training.composition import compose_config_args, merge_config_files
from insightedit.training.sharding import FSDP2Strategy, ShardingSettings

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if "data_build" not in p.parts)  # Lightning configs
# foundation recipes (tiny/foundations/) are ordinary fits of their own systems, tested in test_foundation_*.py
FOUNDATIONS = [p for p in ALL if "foundations" in p.parts]
# complete configs name a model; overlays (strategy, devices, quantization) are composed after a stage
COMPLETE = [
    p for p in ALL if p not in FOUNDATIONS and "class_path" in (yaml.safe_load(p.read_text()).get("model") or {})
]
OVERLAYS = [p for p in ALL if p not in COMPLETE and p not in FOUNDATIONS]
DATA_BUILD = sorted((CONFIGS / "data_build").glob("*.yaml"))  # `insightedit data build --config`


def _local_run(config: dict, root: Path) -> dict:
    """Local synthetic data and a CPU trainer, in place."""
    data = config["data"]["init_args"]
    data.update(root=str(root / "data"), synthetic={"num_images": 12, "size": 32, "seed": 0},
                resolution=32, mllm_size=32, clip_size=32, num_workers=0, batch_size=2)
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", devices=1, num_nodes=1, strategy="auto", precision="32-true",
                   default_root_dir=str(root / "run"), logger=False, callbacks=None)
    return config


def _without_weights(model: dict) -> dict:
    """The model section with no named weights, dtypes or previous stage (nothing to download or read)."""
    if "init_from" in model:
        model["init_from"] = None
    model.pop("pretrained", None)
    for sections in (model, model.get("section_overrides") or {}):  # an overlay's part settings too
        for section in ("comprehension", "generation", "head"):
            for key in ("pretrained", "dtype", "text_encoder"):
                (sections.get(section) or {}).pop(key, None)
        (sections.get("bridging") or {}).pop("clip_pretrained", None)
    return model


def as_tiny(config: dict, root: Path) -> dict:
    """The same config with tiny twins, local synthetic data and a CPU trainer."""
    _without_weights(config["model"]["init_args"])["preset"] = "tiny"
    return _local_run(config, root)


def as_meta(config: dict, root: Path) -> dict:
    """The same config at its own size with no weights named (a full preset then builds on ``meta``)."""
    _without_weights(config["model"]["init_args"])
    return _local_run(config, root)


def _names(paths) -> set[str]:
    return {p.relative_to(CONFIGS).as_posix() for p in paths}


def test_every_config_is_tested():
    """Each file under lightning_configs/ is a complete config, an overlay or a data-build config, tested as one."""
    files = _names(p for p in CONFIGS.rglob("*") if p.is_file())
    assert files == _names(COMPLETE) | _names(OVERLAYS) | _names(DATA_BUILD) | _names(FOUNDATIONS)  # no stray file
    stages = {"base.yaml", "stage1.yaml", "stage2.yaml", "stage3.yaml"} | {f"tiny/stage{n}.yaml" for n in (1, 2, 3)}
    members = {f"{prefix}{name}.yaml" for name in MEMBERS if name != "insightedit" for prefix in ("", "tiny/")}
    assert stages | members <= _names(COMPLETE)  # InsightEdit's are the stage files; every other member has two
    for path in COMPLETE:  # every model is a member of the zoo on the one system
        model = yaml.safe_load(path.read_text())["model"]
        assert model["class_path"] == "insightedit.systems.editor_system.EditorSystem", path
        assert model["init_args"]["member"] in MEMBERS, path
    assert {"fsdp_8gpu.yaml", "fsdp2_8gpu.yaml", "ddp.yaml", "qlora_1gpu.yaml"} <= _names(OVERLAYS)
    assert {"data_build/oracle.yaml", "data_build/vllm_qwen.yaml"} <= _names(DATA_BUILD)
    for path in OVERLAYS:  # an overlay changes a stage's settings, never which classes run
        raw = yaml.safe_load(path.read_text())
        assert isinstance(raw, dict) and set(raw) <= {"model", "data", "trainer"}, path  # not a broken complete one
        assert "class_path" not in (raw.get("data") or {}), path


# local model folders build configs name; validation requires them to exist (in validate()'s order)
BUILD_FOLDERS = (("segment", "grounding_dino"), ("segment", "sam"), ("inpaint", "model"))


def _contained(expected, actual, where: str = "") -> None:
    """Every key and value of ``expected`` (a yaml mapping) is in ``actual``, recursively."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} is dropped"
            _contained(value, actual[key], f"{where}.{key}")
    else:
        assert expected == actual, (where, expected, actual)


@pytest.mark.parametrize("path", DATA_BUILD, ids=lambda p: p.name)
def test_data_build_config_parses_and_validates(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    steps = raw["steps"]
    placeholders = [(s, k) for s, k in BUILD_FOLDERS if (steps.get(s) or {}).get(k) and not Path(steps[s][k]).is_dir()]
    if placeholders:  # model folders of another machine: the loader says which one is missing, then accepts stand-ins
        section, key = placeholders[0]
        with pytest.raises(UserError, match=rf"^steps\.{section}\.{key}: folder {re.escape(steps[section][key])} does"):
            load_config(path)
        for section, key in placeholders:
            (tmp_path / key).mkdir()
            steps[section][key] = str(tmp_path / key)
        config = config_from_dict(raw, path.name)
    else:
        config = load_config(path)
    # what the loader built is what the file says (yaml anchors merged, x- keys only anchors)
    loaded = OmegaConf.to_container(OmegaConf.structured(config))
    _contained({k: v for k, v in raw.items() if not str(k).startswith("x-")}, loaded)


@pytest.mark.parametrize("path", FOUNDATIONS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_foundation_config_parses(path):
    """Each foundation recipe parses with the real parser (its fit is tested with its system)."""
    assert main(["fit", "--config", str(path), "--print_config"]) == 0


@pytest.mark.parametrize("path", COMPLETE, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_parses_and_instantiates(path, tmp_path):
    """Tiny configs build for real; full-size ones build on ``meta`` (no weights named, nothing allocated)."""
    raw = yaml.safe_load(path.read_text())
    # the file itself parses with the real parser (omegaconf mode), weights and all
    assert main(["fit", "--config", str(path), "--print_config"]) == 0
    init_args = raw["model"]["init_args"]
    full = init_args["preset"] == "full"
    # as `insightedit plan` builds it (the full MLLM and UNet go to meta by themselves, the bridge does not yet)
    with torch.device("meta") if full else contextlib.nullcontext():
        cli = _instantiate(as_meta(raw, tmp_path), tmp_path)
    assert cli.datamodule.hparams["resolution"] == 32
    system = cli.model
    assert isinstance(system, EditorSystem) and system.hparams["member"] == init_args["member"]
    assert all(p.is_meta == full for p in system.parameters())
    editor_class = get_member(init_args["member"]).editor_class()
    assert type(system.editor) is editor_class
    assert system.stage.name == editor_class.stages[init_args["stage"]]["name"]
    assert system.trainable_names()  # every stage of every member trains something
    if init_args["member"] == "instruct_pix2pix":  # text-only UNet; explicit instructions only
        assert system.editor.generation.unet.image_projection is None
        assert system.editor.generation.text_encoder is not None
        assert cli.datamodule.hparams["reasoning_probability"] == 0.0


def test_tiny_members_train_on_the_same_terms_as_insightedit():
    """tiny/<member>.yaml = tiny/stage3.yaml but for the member, its run folder and what it lacks."""
    reference = yaml.safe_load((CONFIGS / "tiny" / "stage3.yaml").read_text())
    for name in ("smartedit", "insightedit_no_iaa", "insightedit_no_bim"):
        config = yaml.safe_load((CONFIGS / "tiny" / f"{name}.yaml").read_text())
        assert config["data"] == reference["data"] and config["seed_everything"] == reference["seed_everything"]
        trainer, expected = dict(config["trainer"]), dict(reference["trainer"])
        assert trainer.pop("default_root_dir") == f"checkpoints/tiny/{name}"
        expected.pop("default_root_dir")
        assert trainer.pop("logger")["init_args"]["name"] == f"tiny-{name.replace('_', '-')}"
        expected.pop("logger")
        assert trainer == expected
        model, same = config["model"]["init_args"], dict(reference["model"]["init_args"])
        assert model.pop("member") == name and same.pop("member") == "insightedit"
        if "mapper" not in get_member(name).editor_class().groups:  # no IAA: no image tokens, no CLIP target
            for key in ("num_image_tokens", "image_scale"):
                same["generation"] = {k: v for k, v in same["generation"].items() if k != key}
            same.pop("bridging")
        assert model == same


def test_tiny_stage_fit_runs_in_process_and_writes_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([
        "fit", "--config", str(CONFIGS / "tiny" / "stage3.yaml"),
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        "--data.init_args.synthetic={num_images: 16, size: 32, seed: 0}",
        "--data.init_args.batch_size=4", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
        # CSV instead of the config's W&B logger (tests/test_training_wandb.py covers that one)
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=checkpoints/tiny/stage3",
        "--trainer.logger.name=logs",
    ])
    assert code == 0
    last = tmp_path / "checkpoints" / "tiny" / "stage3" / "last.ckpt"
    assert last.is_file()
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert not any("vision_tower" in k for k in checkpoint["state_dict"])
    saved = yaml.safe_load((last.parent / "config.yaml").read_text())  # the resolved config, beside the weights
    assert saved["trainer"]["max_steps"] == 3 and saved["model"]["init_args"]["stage"] == 3
    metrics = (tmp_path / "checkpoints" / "tiny" / "stage3" / "logs").rglob("metrics.csv")
    text = next(metrics).read_text()
    for key in ("train/loss_llm", "train/loss_iaa", "train/loss_align", "train/loss_diff", "val/loss"):
        assert key in text


def test_tiny_instruct_pix2pix_fits_and_its_unet_starts_the_other_tiny_members(tmp_path, monkeypatch):
    """The stand-in's checkpoint (``editor.generation.unet.unet.*``) is what ``generation.pretrained`` loads."""
    monkeypatch.chdir(tmp_path)
    code = main([
        "fit", "--config", str(CONFIGS / "tiny" / "instruct_pix2pix.yaml"), "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.logger=false",
        "--data.init_args.synthetic={num_images: 16, size: 32, seed: 0}", "--data.init_args.batch_size=4",
        "--trainer.enable_progress_bar=false",
    ])
    assert code == 0
    last = tmp_path / "checkpoints" / "tiny" / "instruct_pix2pix" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["insightedit"]["member"] == "instruct_pix2pix"
    prefix = "editor.generation.unet.unet."
    unet = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    assert unet and set(checkpoint["state_dict"]) == {prefix + k for k in unet}  # the UNet: all it trains
    raw = yaml.safe_load((CONFIGS / "tiny" / "smartedit.yaml").read_text())
    tiny3 = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)["model"]["init_args"]  # the foundations root
    generation = {**tiny3["generation"], "pretrained": str(last)}
    started = EditorSystem(member="smartedit", preset="tiny", stage=3, generation=generation)
    loaded = started.editor.generation.unet.unet.state_dict()
    assert loaded.keys() == unet.keys()
    for name, weight in unet.items():
        assert torch.equal(loaded[name], weight), name


def test_a_config_that_cannot_be_built_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not beside a run of the main job (that would be refused first)
    code = main(["fit", "--config", str(CONFIGS / "tiny" / "stage3.yaml"),
                 f"--model.init_args.init_from={tmp_path / 'missing.ckpt'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot build what the config describes: init_from: checkpoint")


def test_a_setting_lightning_refuses_once_the_run_is_set_up_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([
        "fit", "--config", str(CONFIGS / "tiny" / "stage3.yaml"), "--trainer.max_steps=3",
        "--trainer.val_check_interval=1000",  # more batches than an epoch of 4 scenes' records holds
        "--data.init_args.synthetic={num_images: 4, size: 32, seed: 0}", "--data.init_args.batch_size=4",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false",
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        err.strip().splitlines()[-1].startswith("error: Lightning refused a setting of this run: `val_check_interval`")
    )


def _instantiate(config: dict, tmp_path: Path) -> InsightEditCLI:
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(config))
    return InsightEditCLI(
        model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
        args=["--config", str(tiny)], run=False, parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=None,
    )


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_composes_with_a_stage_and_instantiates(overlay, tmp_path, capsys):
    stage, over = CONFIGS / "stage3.yaml", yaml.safe_load(overlay.read_text())
    # the real CLI deep-merges the files: the overlay's keys win, the stage's other settings stay
    assert main(["fit", "--config", str(stage), "--config", str(overlay), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    named = (over.get("model", {}).get("init_args", {}).get("comprehension") or {}).get("pretrained")
    assert printed["model"]["init_args"]["comprehension"]["pretrained"] == (named or "llava-hf/llava-1.5-7b-hf")
    resolved = _resolved([stage, overlay])["trainer"]  # full_width_cpu.yaml's paths follow ${...}
    for key in over.get("trainer", {}):
        if key in ("logger", "callbacks"):  # printed with every default of their classes: the overlay's are in them
            expected = resolved[key] if key == "logger" else dict(enumerate(resolved[key]))
            shown = printed["trainer"][key]
            _contained(expected, shown if key == "logger" else dict(enumerate(shown)))
        elif key != "strategy":
            assert printed["trainer"][key] == resolved[key], key
    for key, value in (over.get("model", {}).get("init_args", {}).get("comprehension") or {}).items():
        assert printed["model"]["init_args"]["comprehension"][key] == value
    merged = merge_config_files([str(stage), str(overlay)])
    cli = _instantiate(as_tiny(merged, tmp_path), tmp_path)
    assert isinstance(cli.model, EditorSystem) and cli.model.stage.name == "full"


def _strategy(config: dict):
    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    return parser.instantiate(parser.parse_object({"strategy": config["trainer"]["strategy"]})).strategy


@pytest.mark.parametrize("files", [["stage3.yaml", "fsdp_8gpu.yaml"], ["base.yaml", "stage2.yaml", "fsdp_8gpu.yaml"]],
                         ids="+".join)
def test_fsdp1_overlay_instantiates_with_wrapping_checkpointing_and_orig_params(files):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = _strategy(merge_config_files([str(CONFIGS / f) for f in files]))
    assert isinstance(strategy, FSDPStrategy)  # replaces the stage's FSDP2 strategy whole
    assert strategy.kwargs["use_orig_params"] is True
    assert str(strategy.sharding_strategy) == "ShardingStrategy.FULL_SHARD"
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
    assert LlamaDecoderLayer in checkpointed and UNetMidBlock2DCrossAttn in checkpointed
    assert LlamaDecoderLayer in strategy.kwargs["auto_wrap_policy"]._module_classes


@pytest.mark.parametrize("files", [["stage1.yaml"], ["stage3.yaml"], ["base.yaml"], ["stage3.yaml", "fsdp2_8gpu.yaml"],
                                   ["base.yaml", "stage2.yaml", "fsdp2_8gpu.yaml"]], ids="+".join)
def test_stage_configs_and_fsdp2_overlay_build_the_fsdp2_strategy(files, tmp_path):
    merged = merge_config_files([str(CONFIGS / f) for f in files])
    strategy = _strategy(merged)
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy._tensor_parallel_size == 1 and strategy.save_distributed_checkpoint is False
    strategy.parallel_devices, strategy.num_nodes = [torch.device("cpu")] * 8, 2
    assert strategy.resolved_data_parallel_size() == 16  # auto: every process of every node
    precision = merged["trainer"]["precision"]
    assert precision == "bf16-mixed"
    cli = _instantiate(as_tiny(merged, tmp_path), tmp_path)
    settings, hparams = cli.model.sharding, cli.model.hparams
    if "fsdp2_8gpu.yaml" in files:  # per-block activation checkpointing instead of the models' own
        assert settings == ShardingSettings(activation_checkpointing=True)
        assert not hparams["comprehension"]["gradient_checkpointing"]
        assert not hparams["generation"]["gradient_checkpointing"]
    else:
        assert settings == ShardingSettings() and hparams["comprehension"]["gradient_checkpointing"]
    policy = settings.mixed_precision(precision)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


def test_ddp_overlay_builds_a_ddp_strategy():
    strategy = _strategy(merge_config_files([str(CONFIGS / "stage3.yaml"), str(CONFIGS / "ddp.yaml")]))
    assert isinstance(strategy, DDPStrategy)


def _resolved(paths: list[Path], **overrides) -> dict:
    merged = merge_config_files([str(p) for p in paths])
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return OmegaConf.to_container(OmegaConf.create(merged), resolve=True)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_file_restates_base_exactly(stage):
    """base.yaml holds what the stages share; every stage file agrees with it except where stages differ."""
    path = CONFIGS / f"stage{stage}.yaml"
    alone = _resolved([path])
    from_base = _resolved([CONFIGS / "base.yaml"], **{"model.init_args.stage": stage})
    assert _resolved([CONFIGS / "base.yaml", path]) == alone
    for config in (alone, from_base):
        config["model"]["init_args"].pop("init_from")
        if stage == 1:  # no UNet, so no edited images to log
            config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                              if not c["class_path"].endswith("EditImageLogger")]
    assert from_base == alone


def test_interpolation_resolves_and_paths_follow_the_stage(tmp_path, capsys):
    assert main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "stage2.yaml"),
                 "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    trainer = printed["trainer"]
    assert trainer["default_root_dir"] == "checkpoints/stage2"
    assert trainer["logger"]["init_args"]["save_dir"] == "checkpoints/stage2"
    assert trainer["callbacks"][0]["init_args"]["dirpath"] == "checkpoints/stage2"


def test_consecutive_configs_merge_into_one_temporary_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  init_args:\n    comprehension: {lora_rank: 8, pretrained: x}\n")
    b.write_text("model:\n  init_args:\n    comprehension: {quantization: 4bit}\n")
    argv, temporary = compose_config_args(["fit", "--config", str(a), f"--config={b}", "--trainer.max_steps=3"])
    try:
        assert argv[:2] == ["fit", "--config"] and argv[3:] == ["--trainer.max_steps=3"]
        merged = yaml.safe_load(Path(argv[2]).read_text())
        expected = {"lora_rank": 8, "pretrained": "x", "quantization": "4bit"}
        assert merged["model"]["init_args"]["comprehension"] == expected
    finally:
        for path in temporary:
            path.unlink()
    assert compose_config_args(["fit", "--config", str(a)]) == (["fit", "--config", str(a)], [])
