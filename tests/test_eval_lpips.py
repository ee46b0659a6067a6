"""LPIPS without downloads: ST-LPIPS from its package, torchmetrics' LPIPS from a local backbone file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from test_eval_support import photo

from insightedit.errors import UserError
from insightedit.evaluation.lpips import backbone_file_name, build_lpips, load_lpips, load_stlpips
from insightedit.evaluation.metrics import to_unit_tensor


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    return to_unit_tensor(photo("astronaut", 64)), to_unit_tensor(photo("coffee", 64))


def test_stlpips_offline_identical_is_zero_and_labelled() -> None:
    pytest.importorskip("stlpips_pytorch")
    metric = load_stlpips("alex")
    a, b = _pair()
    assert metric(a, a.clone()) == 0.0
    assert metric(a, b) > 0.01
    assert "NOT the paper's LPIPS" in metric.label


def test_lpips_backbone_from_local_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = torchvision.models.squeezenet1_1(weights=None)
    path = tmp_path / "random-squeezenet1_1.pth"
    torch.save(backbone.state_dict(), path)

    metric = load_lpips("squeeze", path)
    loaded = dict(metric.network.net.named_parameters())
    assert torch.equal(loaded["slices.0.0.weight"], backbone.features[0].weight)  # features.0 -> slice1.0
    assert torch.equal(loaded["slices.6.12.expand3x3.weight"], backbone.features[12].expand3x3.weight)
    a, b = _pair()
    assert metric(a, a.clone()) == 0.0
    assert metric(a, b) > 0.0
    assert "UNOFFICIAL" in metric.label and metric.details["backbone_is_official"] == "false"


def test_missing_or_wrong_backbone_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="squeezenet1_1-b8a52dc0.pth") as error:
        load_lpips("squeeze", tmp_path / "nowhere.pth")
    assert "--lpips-weights" in str(error.value) and "download.pytorch.org" in str(error.value)
    alexnet = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), alexnet)
    with pytest.raises(UserError, match="squeeze"):
        load_lpips("squeeze", alexnet)
    assert backbone_file_name("vgg") == "vgg16-397923af.pth"
    assert build_lpips("none", "squeeze") is None
