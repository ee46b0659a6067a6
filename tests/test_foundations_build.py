"""The tiny foundations for real: the built layout, the cache, and the zoo's tiny configs starting from them.

The micro-foundations (tests/_foundations.py, built once by the ``tiny_foundations`` fixture) are real
runs of lightning_configs/tiny/foundations/*.yaml and tiny/instruct_pix2pix.yaml, two steps each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _foundations import micro_overrides
from omegaconf import OmegaConf
from transformers import CLIPTextModel

from insightedit.commands.foundations import FOUNDATIONS, STAMP, FoundationBuilder
from insightedit.systems.editor_system import EditorSystem

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "lightning_configs" / "tiny"


def resolved_init_args(name: str) -> dict:
    """``model.init_args`` of tiny/<name>.yaml with ``${oc.env:INSIGHTEDIT_FOUNDATIONS,...}`` resolved."""
    raw = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)["model"]["init_args"]


def test_micro_foundations_layout_and_cache(tiny_foundations: Path) -> None:
    """Each run folder holds its output, its stamp and metric; built again with the same settings, all are skipped."""
    root = tiny_foundations
    assert json.loads((root / "clip" / "export" / "foundation.json").read_text())["kind"] == "clip"
    assert json.loads((root / "mllm" / "export" / "foundation.json").read_text())["kind"] == "mllm"
    assert (root / "instruct_pix2pix" / "last.ckpt").is_file()
    for foundation in FOUNDATIONS:
        stamp = json.loads((root / foundation.name / STAMP).read_text())
        assert stamp["metric"], foundation.name  # the held-out metric each run wrote
    assert "val/loss_diff" in json.loads((root / "instruct_pix2pix" / STAMP).read_text())["metric"]

    def refuse(argv: list[str], settings: object = None) -> int:
        raise AssertionError(f"rebuilt: {argv}")

    lines: list[str] = []
    builder = FoundationBuilder(root, REPO / "lightning_configs", extra=micro_overrides(root), runner=refuse)
    builder.report = lines.append
    assert not any(outcome.built for outcome in builder.build())
    assert [line.split(":")[0] for line in lines] == ["clip", "mllm", "instruct_pix2pix"]
    assert all(": current, skipped (" in line for line in lines)


def test_tiny_configs_start_from_the_foundations(tiny_foundations: Path) -> None:
    """tiny/stage3.yaml: the text encoder is the CLIP foundation's text tower, the UNet the stand-in's, every tensor."""
    init_args = resolved_init_args("stage3")
    root = str(tiny_foundations)
    assert init_args["generation"]["text_encoder"] == f"{root}/clip/export"
    assert init_args["generation"]["pretrained"] == f"{root}/instruct_pix2pix/last.ckpt"
    assert init_args["bridging"]["clip_pretrained"] == f"{root}/clip/export"
    assert init_args["comprehension"]["pretrained"] == f"{root}/mllm/export"
    init_args.pop("evaluation", None)
    system = EditorSystem(**init_args)
    assert not any(p.is_meta for p in system.parameters())
    generation = system.editor.generation
    expected = CLIPTextModel.from_pretrained(f"{root}/clip/export").state_dict()
    loaded = generation.text_encoder.model.state_dict()
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], v) for k, v in expected.items())
    checkpoint = torch.load(f"{root}/instruct_pix2pix/last.ckpt", map_location="cpu", weights_only=True)
    prefix = "editor.generation.unet.unet."
    unet = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    state = generation.unet.unet.state_dict()
    assert unet and all(torch.equal(state[k], v) for k, v in unet.items())


@pytest.mark.parametrize("name", ["smartedit", "mgie", "insightedit_no_iaa", "insightedit_no_bim"])
def test_every_tiny_member_builds_from_the_foundations(tiny_foundations: Path, name: str) -> None:
    """Each member's tiny config builds with every part real (nothing left on meta) from the foundations."""
    init_args = resolved_init_args(name)
    init_args.pop("evaluation", None)
    system = EditorSystem(**init_args)
    assert not any(p.is_meta for p in [*system.parameters(), *system.buffers()])
    assert system.editor.generation.text_encoder.tokenizer is not None


@pytest.mark.slow  # about 2 minutes on 2 idle cores (4 on a busy machine): three real fits at 0.2% of their steps
def test_the_command_builds_then_skips(tmp_path: Path) -> None:
    """``insightedit foundations --steps-scale 0.002``: clip, mllm, instruct_pix2pix built, then all current."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [
        sys.executable, "-m", "insightedit", "foundations", "--configs", str(REPO / "lightning_configs"),
        "--out", str(tmp_path / "f"), "--steps-scale", "0.002",
    ]  # fmt: skip
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-2000:]
    built = [line for line in first.stdout.splitlines() if ": built in " in line]
    assert [line.split(":")[0] for line in built] == ["clip", "mllm", "instruct_pix2pix"]
    assert "held-out retrieval_top1 " in built[0] and "held-out answer_accuracy " in built[1]
    assert "val/loss_diff" in built[2]
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count(": current, skipped (") == 3
