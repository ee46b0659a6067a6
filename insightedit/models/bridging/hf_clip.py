"""A transformers CLIP folder's image tower as an open_clip ``visual``: the IAA target from a ``save_pretrained`` CLIP.

The bridging model's frozen IAA target is an open_clip image tower. A transformers ``CLIPModel`` folder
(the tiny CLIP foundation's ``export/``, or ``openai/clip-vit-*`` downloaded) holds the same network
under other names: :func:`hf_clip_visual_state` renames its vision tower and ``visual_projection`` into
an open_clip ``VisionTransformer`` state dict (q, k and v projections concatenated into ``in_proj``,
the projection transposed), so the open_clip tower computes the same embedding as
``CLIPModel.get_image_features``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from insightedit.errors import UserError

HF_WEIGHTS = "model.safetensors"


def is_hf_clip_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a transformers CLIP ``config.json`` (``model_type`` ``clip``)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


def hf_clip_visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``CLIPModel`` state dict's vision tower + ``visual_projection`` into open_clip ``visual`` keys."""
    prefix = "vision_model."
    layer_prefix = prefix + "encoder.layers."
    num_layers = len({key[len(layer_prefix) :].split(".")[0] for key in state if key.startswith(layer_prefix)})
    out: dict[str, torch.Tensor] = {
        "class_embedding": state[prefix + "embeddings.class_embedding"],
        "positional_embedding": state[prefix + "embeddings.position_embedding.weight"],
        "conv1.weight": state[prefix + "embeddings.patch_embedding.weight"],
        "ln_pre.weight": state[prefix + "pre_layrnorm.weight"],
        "ln_pre.bias": state[prefix + "pre_layrnorm.bias"],
        "ln_post.weight": state[prefix + "post_layernorm.weight"],
        "ln_post.bias": state[prefix + "post_layernorm.bias"],
        "proj": state["visual_projection.weight"].T.contiguous(),  # open_clip computes x @ proj
    }
    for i in range(num_layers):
        hf, oc = f"{prefix}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        attention = [hf + f"self_attn.{name}_proj" for name in ("q", "k", "v")]
        out[oc + "attn.in_proj_weight"] = torch.cat([state[name + ".weight"] for name in attention])
        out[oc + "attn.in_proj_bias"] = torch.cat([state[name + ".bias"] for name in attention])
        pairs = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for oc_name, hf_name in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{oc}{oc_name}.{kind}"] = state[f"{hf}{hf_name}.{kind}"]
    return out


def load_hf_clip_visual(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read ``folder``'s ``model.safetensors`` and return its image tower as an open_clip ``visual`` state dict.

    Raises :class:`UserError` (one line) when the folder has no weights or they are not a CLIP's.
    """
    weights = Path(folder) / HF_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{folder} has a CLIP config but no {HF_WEIGHTS}; rebuild it (insightedit foundations)")
    state = load_file(str(weights))
    try:
        return hf_clip_visual_state(state)
    except KeyError as error:
        raise UserError(f"{weights} is not a transformers CLIPModel's weights (no {error.args[0]})") from None
