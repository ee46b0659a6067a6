"""IAA, image-aware alignment: the Mapper from [MM] states to a CLIP image vector, and its frozen target.

The Mapper turns the MLLM's [MM] states into one CLIP-image-sized vector; the frozen open_clip image
encoder gives its target.

``L_IAA = MSE(Mapper(h), CLIP(I_tar))``. The expansion of the vector to N image tokens is not here: the
generation module's ``EditUNet.image_projection`` (diffusers' ``ImageProjection``) does it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from copy import deepcopy
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from insightedit.errors import UserError
from insightedit.hub_weights import check_hub_weights, clip_hub_weights
from insightedit.models.bridging.hf_clip import is_hf_clip_folder, load_hf_clip_visual
from insightedit.models.bridging.qformer import full_attention_mask
from insightedit.models.loading import PretrainedPart, assign_or_copy
from insightedit.models.loads import report_loaded

FOUNDATIONS_COMMAND = "insightedit foundations"


def masked_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``h`` (B, r, d) over r, counting only positions where ``mask`` (B, r) is set: (B, d)."""
    if mask is None:
        return h.mean(dim=1)  # (B, d)
    weights = full_attention_mask(mask, h.shape[0], h.shape[1], h.device).to(h.dtype).unsqueeze(-1)  # (B, r, 1)
    return (h * weights).sum(dim=1) / weights.sum(dim=1)  # (B, d)


class Mapper(nn.Module):
    """IAA's Mapper: mean-pool h (B, r, d_llm) over the [MM] positions, then LayerNorm -> MLP -> (B, D_clip).

    Pooling first (*ours*; the paper says only "MLP from h") makes the Mapper independent of r and keeps
    it small; the LayerNorm puts the pooled LLM state on a fixed scale before the first Linear.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, h: torch.Tensor, mm_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Map h (B, r, d_llm) to the IAA embedding (B, D_clip)."""
        return self.mlp(self.norm(masked_mean(h, mm_mask)))  # (B, D_clip)


class ClipImageEncoder(PretrainedPart, nn.Module):
    """The frozen image tower of an open_clip model: CLIP-normalised pixels (B, 3, S, S) -> (B, D_clip).

    Only ``visual`` is kept (the text tower is dropped). It never trains: its parameters do not require
    gradients, ``train()`` leaves it in eval mode, and ``encode_image`` runs without autograd.

    Args:
        visual: an open_clip image tower (``model.visual``), whose output is the projected embedding.
        normalize: L2-normalise the embedding (``False``: the raw projected embedding that IP-Adapter's
            image projection is trained on).
    """

    def __init__(self, visual: nn.Module, normalize: bool = False) -> None:
        super().__init__()
        self.visual = visual.requires_grad_(False).eval()
        self.normalize = normalize
        size = getattr(visual, "image_size", 224)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.embed_dim = int(getattr(visual, "output_dim", 0))
        self.load_options: dict[str, Any] = {}  # with ``pretrained``: open_clip's model name and settings

    @torch.no_grad()
    def load_pretrained(self) -> None:
        """Read the CLIP weights ``pretrained`` names (a local file or an open_clip tag) into the image tower."""
        if self.pretrained is None:
            return
        if self.load_options.get("format") == "transformers":
            self._load_transformers_folder(self.pretrained)
            return
        model, quick_gelu, cache_dir = (self.load_options[k] for k in ("model", "quick_gelu", "cache_dir"))
        hub = clip_hub_weights("bridging.clip_pretrained", self.pretrained, model)
        if hub is not None:
            check_hub_weights([hub])  # one line naming the hub repo, not open_clip's retries
        try:
            if isinstance(model, Mapping):  # a model config with a local file (e.g. ViT-L/14 widths, fewer layers)
                clip = open_clip.CLIP(**{"quick_gelu": quick_gelu, **deepcopy(model)})
                open_clip.load_checkpoint(clip, self.pretrained, strict=True)
            else:
                clip = open_clip.create_model(
                    model,
                    pretrained=self.pretrained,
                    device="cpu",
                    force_quick_gelu=quick_gelu,
                    cache_dir=cache_dir,
                    require_pretrained=True,
                )
        except RuntimeError as error:
            raise UserError(
                f"could not load CLIP weights {self.pretrained!r} for {model!r} (no network here? give a local "
                f"checkpoint file): {error}"
            ) from error
        state = clip.visual.state_dict()
        assign_or_copy(self.visual, state)
        self.visual.requires_grad_(False)
        name = model if isinstance(model, str) else "config"
        report_loaded("bridging.clip_pretrained", len(state), self.pretrained, f"CLIP {name}'s image tower")
        self.pretrained_loaded = True

    def _load_transformers_folder(self, folder: str) -> None:
        """Read a transformers ``CLIPModel`` folder's image tower + ``visual_projection`` into the open_clip tower."""
        if not is_hf_clip_folder(folder):
            raise UserError(
                f"bridging.clip_pretrained: {folder} is not a CLIP folder (no CLIP config.json there); build the "
                f"tiny CLIP foundation with `{FOUNDATIONS_COMMAND}`, or give an open_clip checkpoint file"
            )
        state = load_hf_clip_visual(folder)
        try:
            assign_or_copy(self.visual, state)
        except RuntimeError as error:  # another CLIP's widths, depth or patch size
            first = (str(error).splitlines()[1:2] or [str(error)])[0].strip()
            raise UserError(
                f"bridging.clip_pretrained: {folder}'s image tower does not fit the bridging CLIP ({first}); "
                f"rebuild it with `{FOUNDATIONS_COMMAND}`"
            ) from error
        self.visual.requires_grad_(False)
        report_loaded("bridging.clip_pretrained", len(state), folder, "the CLIP folder's image tower and projection")
        self.pretrained_loaded = True

    def train(self, mode: bool = True) -> ClipImageEncoder:
        """Stay in eval mode whatever is asked (the target encoder is frozen)."""
        return super().train(False)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed CLIP-normalised pixels (B, 3, H, W) -> (B, D_clip); other sizes are resized (bicubic) first."""
        if tuple(pixels.shape[-2:]) != self.image_size:
            pixels = F.interpolate(pixels, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        weight = next(self.visual.parameters())
        embeds = self.visual(pixels.to(device=weight.device, dtype=weight.dtype))  # (B, D_clip)
        return F.normalize(embeds, dim=-1) if self.normalize else embeds

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode_image`."""
        return self.encode_image(pixels)


def _is_folder_route(pretrained: str) -> bool:
    """Whether ``pretrained`` names a transformers CLIP folder (or a folder path yet to be built), not a file or tag."""
    return os.path.isdir(pretrained) or (not os.path.exists(pretrained) and os.sep in pretrained)


def _resolve_pretrained(model_name: str, pretrained: str) -> str:
    """Accept a local file or a known open_clip tag; otherwise raise a clear :class:`UserError`."""
    if os.path.isfile(pretrained) or is_hf_clip_folder(pretrained):
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        return pretrained
    raise UserError(
        f"CLIP weights {pretrained!r} for open_clip model {model_name!r} are neither a file nor a known tag "
        f"({', '.join(tags) or 'none'}); give the path of a local open_clip checkpoint"
    )


def build_clip_image_encoder(
    model: str | Mapping[str, Any] = "ViT-L-14",
    pretrained: str | None = None,
    quick_gelu: bool = False,
    normalize: bool = False,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
) -> ClipImageEncoder:
    """Build the frozen CLIP image encoder from an open_clip model name or a model-config dict.

    Args:
        model: an open_clip model name (``"ViT-L-14"``), built with ``open_clip.create_model``, or a model
            config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) built with ``open_clip.CLIP``.
        pretrained: ``None`` (random init, nothing loaded or downloaded), a local checkpoint file, an
            open_clip tag such as ``"openai"`` (open_clip fetches it unless it is in ``cache_dir``), or a
            transformers ``CLIPModel`` folder (the tiny CLIP foundation's ``export/``; its vision tower and
            projection are renamed into open_clip's, :mod:`.hf_clip`), read by the encoder's
            ``load_pretrained`` (nothing is read here). With a config dict: a local file or a folder.
        quick_gelu: use QuickGELU, as OpenAI's CLIP weights require.
        normalize: L2-normalise embeddings (see :class:`ClipImageEncoder`).
        device: where to build; ``"meta"`` builds shapes only.
    """
    target = torch.device(device) if device is not None else torch.get_default_device()
    if isinstance(model, Mapping):
        if pretrained is not None and not os.path.isfile(pretrained) and not _is_folder_route(pretrained):
            raise UserError(
                f"CLIP weights {pretrained!r} for a CLIP config dict must be a local open_clip checkpoint file or "
                f"a CLIP folder (the tiny CLIP foundation's export/, built by `{FOUNDATIONS_COMMAND}`); a tag "
                "needs a model name such as ViT-L-14"
            )
        config = dict(deepcopy(model))
        config.setdefault("quick_gelu", quick_gelu)
        with target:
            clip = open_clip.CLIP(**config)
        if pretrained is not None:  # read by ``load_pretrained``, not here
            encoder = ClipImageEncoder(clip.visual, normalize=normalize)
            encoder.pretrained = pretrained
            encoder.load_options = {"model": dict(model), "quick_gelu": quick_gelu, "cache_dir": cache_dir}
            if not os.path.isfile(pretrained):
                encoder.load_options["format"] = "transformers"
            return encoder
    else:
        resolved = _resolve_pretrained(model, pretrained) if pretrained is not None else None
        with target:  # the architecture only: the weights are read by ``load_pretrained``
            clip = open_clip.create_model(model, device=target, force_quick_gelu=quick_gelu, cache_dir=cache_dir)
        if resolved is not None:
            encoder = ClipImageEncoder(clip.visual, normalize=normalize)
            encoder.pretrained = resolved
            encoder.load_options = {"model": model, "quick_gelu": quick_gelu, "cache_dir": cache_dir}
            if os.path.isdir(resolved):
                encoder.load_options["format"] = "transformers"
            return encoder
    return ClipImageEncoder(clip.visual, normalize=normalize)
