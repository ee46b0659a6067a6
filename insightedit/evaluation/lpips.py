"""LPIPS with weights that are never downloaded: torchmetrics' LPIPS on a local backbone file, or ST-LPIPS.

torchmetrics ships LPIPS v0.1's linear layers (``lpips_models/{net}.pth``) but fetches the ImageNet
backbone from torchvision's servers. :func:`load_lpips` builds the same network with a random backbone
and fills it from a local torchvision checkpoint, so the only file a user supplies is that checkpoint;
when it is missing the error names the file and where to get it. :func:`load_stlpips` uses the
``stlpips-pytorch`` package, which ships complete shift-tolerant networks (AlexNet, VGG): a real
perceptual metric offline, but *not* the paper's LPIPS, and labelled as such in every report.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from insightedit.errors import UserError

LPIPS_NETS: tuple[str, ...] = ("squeeze", "alex", "vgg")
STLPIPS_NETS: tuple[str, ...] = ("alex", "vgg")

# net -> (torchvision weights enum, checkpoint URL); the file name carries the sha256 prefix.
_TORCHVISION_BACKBONES: dict[str, tuple[str, str]] = {
    "squeeze": ("SqueezeNet1_1_Weights", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
    "alex": ("AlexNet_Weights", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("VGG16_Weights", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}


# torchmetrics names the backbone's layers slice1.N.* (alex, vgg) or slices.K.N.* (squeeze); N indexes
# torchvision's ``features``.
_SLICE_KEY = re.compile(r"^(?:slices\.\d+|slice\d+)\.(\d+)\.(.+)$")


def backbone_file_name(net: str) -> str:
    """The torchvision checkpoint file name LPIPS on ``net`` needs, e.g. ``squeezenet1_1-b8a52dc0.pth``."""
    return _TORCHVISION_BACKBONES[net][1].rsplit("/", 1)[1]


def default_backbone_path(net: str) -> Path:
    """Where torchvision would cache the backbone: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / backbone_file_name(net)


def _missing_backbone_message(net: str, tried: Path) -> str:
    name = backbone_file_name(net)
    url = _TORCHVISION_BACKBONES[net][1]
    return (
        f"LPIPS ({net}) needs the torchvision ImageNet backbone file {name}, not found at {tried}. "
        f"Download {url} on a machine with internet and pass --lpips-weights PATH (or copy it to "
        f"{default_backbone_path(net)}); or use --lpips stlpips (shift-tolerant, not the paper's LPIPS) "
        f"or --lpips none"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LpipsMetric:
    """A loaded LPIPS network and the label every report prints next to its numbers."""

    network: nn.Module
    label: str
    details: dict[str, str]
    device: torch.device

    @torch.no_grad()
    def __call__(self, a: Tensor, b: Tensor) -> float:
        """LPIPS distance between two ``(1, 3, H, W)`` images in [0, 1] (fed to the net in [−1, 1])."""
        if a.shape != b.shape:
            raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        first = (a.float() * 2 - 1).to(self.device)
        second = (b.float() * 2 - 1).to(self.device)
        return float(self.network(first, second).reshape(-1)[0])


def _load_backbone_state(network: nn.Module, path: Path, net: str) -> None:
    """Copy a torchvision checkpoint (``features.N.*``) into torchmetrics' ``slice[s]K.N.*`` keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error here
        raise UserError(f"cannot read LPIPS backbone file {path}: {error}") from error
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a state dict (expected torchvision's {backbone_file_name(net)})")
    target = network.state_dict()
    update = {}
    for key in target:
        match = _SLICE_KEY.match(key)
        if match is None:
            raise RuntimeError(f"unexpected torchmetrics LPIPS backbone key {key!r}")
        source_key = f"features.{match.group(1)}.{match.group(2)}"
        if source_key not in state:
            raise UserError(
                f"{path} is not a torchvision {net} checkpoint: key {source_key!r} is missing "
                f"(expected the contents of {backbone_file_name(net)})"
            )
        if state[source_key].shape != target[key].shape:
            raise UserError(
                f"{path}: {source_key} has shape {tuple(state[source_key].shape)}, "
                f"expected {tuple(target[key].shape)} for LPIPS ({net})"
            )
        update[key] = state[source_key]
    network.load_state_dict(update, strict=True)


def load_lpips(net: str = "squeeze", weights: str | Path | None = None, device: str = "cpu") -> LpipsMetric:
    """LPIPS v0.1 (torchmetrics' network and linear layers) with the backbone read from a local file."""
    if net not in LPIPS_NETS:
        raise UserError(f"unknown LPIPS backbone {net!r}; choose from {', '.join(LPIPS_NETS)}")
    path = Path(weights).expanduser() if weights is not None else default_backbone_path(net)
    if not path.is_file():
        raise UserError(_missing_backbone_message(net, path))
    # Private torchmetrics class: the public metric would download the backbone (pnet_rand=False).
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    network = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)  # linear layers shipped with torchmetrics
    _load_backbone_state(network.net, path, net)
    sha = _sha256(path)
    expected = backbone_file_name(net).rsplit("-", 1)[1].split(".")[0]
    details = {
        "implementation": "torchmetrics LPIPS v0.1",
        "backbone": net,
        "backbone_file": str(path),
        "backbone_sha256": sha,
        "backbone_is_official": str(sha.startswith(expected)).lower(),
    }
    official = "" if sha.startswith(expected) else ", UNOFFICIAL backbone file"
    label = f"LPIPS-{net} (torchmetrics v0.1{official})"
    return LpipsMetric(network.to(device).eval(), label, details, torch.device(device))


def _import_stlpips() -> types.ModuleType:
    """Import ``stlpips_pytorch.stlpips``; it imports IPython and torchsummary unused."""
    try:
        importlib.import_module("stlpips_pytorch")
    except ImportError as error:
        raise UserError("--lpips stlpips needs the package stlpips-pytorch: pip install stlpips-pytorch") from error
    for name, attribute in (("IPython", "embed"), ("torchsummary", "summary")):
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            setattr(stub, attribute, lambda *args, **kwargs: None)
            sys.modules[name] = stub
    return importlib.import_module("stlpips_pytorch.stlpips")


def load_stlpips(net: str = "alex", device: str = "cpu") -> LpipsMetric:
    """Shift-tolerant LPIPS from ``stlpips-pytorch`` (weights in the package; NOT the paper's LPIPS)."""
    if net not in STLPIPS_NETS:
        raise UserError(f"ST-LPIPS ships backbones {', '.join(STLPIPS_NETS)}, not {net!r}")
    module = _import_stlpips()
    network = module.LPIPS(net=net, variant="shift_tolerant", verbose=False)
    path = Path(module.__file__).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
    # The package loads with strict=False; check that every parameter really came from the file.
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in network.state_dict() if key not in state and not key.startswith("lins.")]
    if missing:
        raise UserError(f"ST-LPIPS weights {path} lack {len(missing)} parameters, e.g. {missing[0]}")
    details = {
        "implementation": "stlpips-pytorch shift-tolerant LPIPS (not the paper's LPIPS)",
        "backbone": net,
        "weights_file": str(path),
    }
    label = f"ST-LPIPS-{net} (shift-tolerant, NOT the paper's LPIPS)"
    return LpipsMetric(network.to(device).eval(), label, details, torch.device(device))


def build_lpips(kind: str, net: str, weights: str | Path | None = None, device: str = "cpu") -> LpipsMetric | None:
    """Build the LPIPS metric chosen by ``kind`` (``lpips``, ``stlpips`` or ``none``)."""
    if kind == "none":
        return None
    if kind == "lpips":
        return load_lpips(net, weights, device)
    if kind == "stlpips":
        if weights is not None:
            raise UserError("--lpips-weights applies to --lpips lpips; ST-LPIPS uses the weights in its package")
        return load_stlpips(net, device)
    raise UserError(f"unknown LPIPS kind {kind!r}; choose lpips, stlpips or none")
