"""Hub weights a config names that are not on this machine: one line naming them and the fix, before any build."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from insightedit import hub_weights
from insightedit.errors import UserError
from insightedit.hub_weights import (
    FULL_CLIP_MODEL,
    OPEN_CLIP_FILES,
    OPENAI_CLIP_HUB,
    HubWeights,
    check_hub_weights,
    configured_hub_weights,
    is_cached,
    require_hub_weights,
)
from insightedit.training.composition import load_yaml

REPO = Path(__file__).resolve().parents[1]
STAGE3 = REPO / "lightning_configs" / "stage3.yaml"
LLAVA = "llava-hf/llava-1.5-7b-hf"
IP2P = "timbrooks/instruct-pix2pix"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty hub cache, downloads off."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_file(cache: Path, repo_id: str, filename: str) -> None:
    """Put ``filename`` of ``repo_id`` in the hub cache as huggingface_hub lays it out."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    path = repo / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")


def test_the_clip_table_is_open_clips():
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import get_pretrained_cfg

    from insightedit.models.bridging.presets import PRESETS

    assert PRESETS["full"].clip_model == FULL_CLIP_MODEL
    assert get_pretrained_cfg(FULL_CLIP_MODEL, "openai")["hf_hub"] == f"{OPENAI_CLIP_HUB}/"  # default file names
    assert OPEN_CLIP_FILES == (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)  # the order open_clip tries them
    # the table answers as open_clip's own lookup does
    quick = hub_weights.clip_hub_weights("x", "openai", known_only=True)
    assert quick == HubWeights("x", "openai", OPENAI_CLIP_HUB, OPEN_CLIP_FILES)
    other = hub_weights.clip_hub_weights("x", "openai", model="ViT-B-32")  # not in the table: open_clip's own
    assert other is not None and f"{other.repo_id}/" == get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"]


def test_the_full_config_names_three_hub_sources(tmp_path):
    init_args = load_yaml(STAGE3)["model"]["init_args"]
    found = configured_hub_weights(init_args)
    assert [(w.option, w.value, w.repo_id) for w in found] == [
        ("comprehension.pretrained", LLAVA, LLAVA),
        ("generation.pretrained", IP2P, IP2P),
        ("bridging.clip_pretrained", "openai", OPENAI_CLIP_HUB),
    ]
    local = {**init_args, "comprehension": {"pretrained": str(tmp_path)}, "generation": {"pretrained": "a.ckpt"}}
    assert [w.option for w in configured_hub_weights(local)] == ["bridging.clip_pretrained"]  # paths are not hub ids
    tiny = load_yaml(REPO / "lightning_configs" / "tiny" / "stage3.yaml")["model"]["init_args"]
    assert configured_hub_weights(tiny) == []


def test_cached_weights_pass_and_missing_ones_are_one_line(empty_cache):
    weights = configured_hub_weights(load_yaml(STAGE3)["model"]["init_args"])
    assert [is_cached(w) for w in weights] == [False, False, False]
    cache_file(empty_cache, LLAVA, "config.json")
    cache_file(empty_cache, OPENAI_CLIP_HUB, "open_clip_pytorch_model.bin")  # either file of open_clip's will do
    assert [is_cached(w) for w in weights] == [True, False, True]
    with pytest.raises(UserError) as raised:
        check_hub_weights(weights)
    message = str(raised.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and "checkpoints/README.md" in message
    assert f"generation.pretrained={IP2P}" in message and LLAVA not in message  # only what is missing
    assert "--model.init_args.generation.pretrained=PATH" in message
    cache_file(empty_cache, IP2P, "unet/config.json")
    check_hub_weights(weights)  # all here: nothing to say


def test_online_the_hub_is_asked_once(empty_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    weights = [HubWeights("comprehension.pretrained", LLAVA, LLAVA, ("config.json",))]
    monkeypatch.setattr(hub_weights, "hub_unreachable", lambda: None)
    check_hub_weights(weights)  # reachable: the library downloads them
    monkeypatch.setattr(hub_weights, "hub_unreachable", lambda: "https://hub.test cannot be reached (ConnectError)")
    with pytest.raises(UserError, match=f"cannot be reached.*{LLAVA}.*HF_HUB_OFFLINE=1 answers at once"):
        check_hub_weights(weights)


def test_an_unreachable_endpoint_answers_without_retries(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    reason = hub_weights.hub_unreachable(timeout=5.0)
    assert reason is not None and reason.startswith("http://127.0.0.1:9 cannot be reached")


def test_loaders_say_it_in_one_line_too(empty_cache):
    from insightedit.models.comprehension.presets import build_llava
    from insightedit.models.generation.presets import build_generation_components, load_generation_weights

    with pytest.raises(UserError, match=f"comprehension.pretrained={LLAVA};"):
        build_llava("full", LLAVA)
    with pytest.raises(UserError, match=f"generation.pretrained={IP2P};"):
        load_generation_weights(build_generation_components("full", IP2P, device="meta"), IP2P)
    with pytest.raises(UserError, match="export with --include-base"):  # an exported folder naming its base
        require_hub_weights(
            "the LLaVA base in m/model_index.json", LLAVA, "config.json", fix="export with --include-base"
        )


def test_fit_with_the_full_config_offline_is_one_line_before_any_heavy_import(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "offline"}
    code = (
        "import sys\nfrom insightedit.cli import main\n"
        f"code = main(['fit', '--config', {str(STAGE3)!r}])\n"
        "print(code, 'torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.stdout.split() == ["2", "False", "False"], run.stderr  # answered before torch was imported
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: weights not on this machine"), run.stderr
    assert (
        LLAVA in lines[0] and IP2P in lines[0] and OPENAI_CLIP_HUB in lines[0] and "checkpoints/README.md" in lines[0]
    )


def test_after_parsing_the_same_check_holds(empty_cache, capsys):
    """A command line the pre-check leaves to the parser (a whole section) is checked before the model is built."""
    from insightedit.lightning_cli import run_lightning_cli

    tiny = REPO / "lightning_configs" / "tiny" / "stage1.yaml"
    section = f'--model.init_args.comprehension={{"pretrained": "{LLAVA}"}}'
    with pytest.raises(UserError, match=f"comprehension.pretrained={LLAVA};"):
        run_lightning_cli(["fit", "--config", str(tiny), section, "--trainer.logger=false"])
