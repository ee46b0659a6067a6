"""The generation UNet: InstructPix2Pix's input concat, an additive ``v_txt`` and decoupled cross-attention.

Everything here is diffusers' own machinery, configured: ``UNet2DConditionModel`` for the network,
``ImageProjection`` for the image tokens, ``IPAdapterAttnProcessor2_0`` for the decoupled
cross-attention ``Attn(Q, K_txt, V_txt) + λ·Attn(Q, K_img, V_img)``. What InsightEdit adds is the
feature map ``v_txt`` added to the output of ``conv_in`` (a forward hook, so the UNet is not forked)
and the folder format that keeps the image branch with the UNet when saved.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection
from safetensors.torch import load_file, save_file
from torch import nn

IMAGE_BRANCH_WEIGHTS = "ip_adapter.safetensors"
EDIT_UNET_CONFIG = "edit_unet_config.json"


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int) -> None:
    """Give ``conv_in`` ``in_channels`` inputs; the added input channels start at zero (InstructPix2Pix)."""
    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    if old.in_channels > in_channels:
        raise ValueError(f"conv_in already has {old.in_channels} > {in_channels} input channels")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


class EditUNet(nn.Module):
    """A diffusers UNet that denoises ``concat(z_t, z_src)``, adds ``v_txt`` and reads ``f_txt`` and ``f_img``.

    Args:
        unet: the diffusers UNet; if its ``in_channels`` equals its ``out_channels`` (a text-to-image
            UNet), ``conv_in`` is widened to twice as many inputs with the new weights at zero.
        image_embed_dim: width of the image embedding the image branch projects (768 for CLIP ViT-L/14);
            ``None`` builds no image branch (plain InstructPix2Pix).
        num_image_tokens: N, the number of image tokens ``f_img`` has.
        image_scale: λ, the weight of the image branch; settable at any time via :attr:`image_scale`.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        image_embed_dim: int | None = 768,
        num_image_tokens: int = 4,
        image_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if unet.config.in_channels == unet.config.out_channels:
            widen_conv_in(unet, 2 * unet.config.in_channels)
        self.unet = unet
        self.latent_channels = int(unet.config.out_channels)
        self.image_embed_dim = image_embed_dim
        self.num_image_tokens = num_image_tokens
        self._image_scale = float(image_scale)
        self._text_only_processors = dict(unet.attn_processors)
        self.image_projection: ImageProjection | None = None
        if image_embed_dim is not None:
            self.image_projection = ImageProjection(
                image_embed_dim=image_embed_dim,
                cross_attention_dim=unet.config.cross_attention_dim,
                num_image_text_embeds=num_image_tokens,
            )
            self._install_image_branch()
        self._v_txt: torch.Tensor | None = None
        self.unet.conv_in.register_forward_hook(self._add_v_txt)

    # ----------------------------------------------------------------------------------- structure
    def _hidden_size(self, processor_name: str) -> int:
        widths = list(self.unet.config.block_out_channels)
        if processor_name.startswith("mid_block"):
            return widths[-1]
        block = int(processor_name.split(".")[1])
        return list(reversed(widths))[block] if processor_name.startswith("up_blocks") else widths[block]

    def _install_image_branch(self) -> None:
        """Swap every cross-attention processor for an IP-Adapter one with K/V initialised from text K/V."""
        modules = dict(self.unet.named_modules())
        processors: dict[str, nn.Module | AttnProcessor2_0] = {}
        for name, processor in self._text_only_processors.items():
            if name.endswith("attn1.processor"):
                processors[name] = processor
                continue
            attention = modules[name.removesuffix(".processor")]
            ip = IPAdapterAttnProcessor2_0(
                hidden_size=self._hidden_size(name),
                cross_attention_dim=self.unet.config.cross_attention_dim,
                num_tokens=(self.num_image_tokens,),
                scale=self._image_scale,
            ).to(device=attention.to_k.weight.device, dtype=attention.to_k.weight.dtype)
            processors[name] = ip
        self.unet.set_attn_processor(processors)
        self.reset_image_branch()

    @torch.no_grad()
    def reset_image_branch(self) -> None:
        """Set every ``to_k_ip``/``to_v_ip`` to its layer's text ``to_k``/``to_v`` (again after the UNet is loaded).

        The image projection keeps its values. Without an image branch, nothing happens.
        """
        modules = dict(self.unet.named_modules())
        for name, ip in self.image_processors().items():
            attention = modules[name.removesuffix(".processor")]
            for own, text in ((ip.to_k_ip[0], attention.to_k), (ip.to_v_ip[0], attention.to_v)):
                if own.weight.is_meta and not text.weight.is_meta:  # built on meta, the UNet loaded since
                    own.weight = nn.Parameter(text.weight.detach().clone(), requires_grad=own.weight.requires_grad)
                else:
                    own.weight.copy_(text.weight)

    def image_processors(self) -> dict[str, IPAdapterAttnProcessor2_0]:
        """The decoupled cross-attention processors by name (empty without an image branch)."""
        return {
            name: proc
            for name, proc in self.unet.attn_processors.items()
            if isinstance(proc, IPAdapterAttnProcessor2_0)
        }

    @property
    def image_scale(self) -> float:
        """λ, the weight of the image branch in every decoupled cross-attention layer."""
        return self._image_scale

    @image_scale.setter
    def image_scale(self, value: float) -> None:
        self._image_scale = float(value)
        for processor in self.image_processors().values():
            processor.scale = [self._image_scale]

    def image_branch_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters InsightEdit adds to the UNet: the image projection and every ``to_k_ip``/``to_v_ip``."""
        if self.image_projection is not None:
            yield from self.image_projection.parameters()
        for processor in self.image_processors().values():
            yield from processor.parameters()

    # ------------------------------------------------------------------------------------- forward
    def _add_v_txt(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if self._v_txt is None:
            return output
        return output + self._v_txt.to(output.dtype)

    def project_image_embeds(self, image_embeds: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """``f_img`` (B, N, D) from image embeddings (B, E); the null condition is the projection of zeros."""
        if self.image_projection is None:
            raise RuntimeError("this EditUNet was built without an image branch (image_embed_dim=None)")
        if image_embeds is None:
            weight = self.image_projection.image_embeds.weight
            image_embeds = torch.zeros(batch_size, self.image_embed_dim, device=weight.device, dtype=weight.dtype)
        return self.image_projection(image_embeds)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        source_latents: torch.Tensor,
        timesteps: torch.Tensor,
        f_txt: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        f_img: torch.Tensor | None = None,
        v_txt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the UNet's target for ``concat(noisy, source)``.

        Shapes: latents (B, C, h, w); ``f_txt`` (B, L, D); ``image_embeds`` (B, E) or ready tokens
        ``f_img`` (B, N, D); ``v_txt`` (B, C0, h, w) with C0 = ``conv_in``'s output width.
        """
        sample = torch.cat([noisy_latents, source_latents], dim=1)
        encoder_states: torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]] = f_txt
        if self.image_projection is not None:
            if f_img is None:
                f_img = self.project_image_embeds(image_embeds, batch_size=sample.shape[0])
            encoder_states = (f_txt, [f_img.unsqueeze(1)])  # processors expect (B, num_images, N, D)
        elif f_img is not None or image_embeds is not None:
            raise ValueError("image conditions given to an EditUNet without an image branch")
        self._v_txt = v_txt
        try:
            return self.unet(sample, timesteps, encoder_hidden_states=encoder_states, return_dict=False)[0]
        finally:
            self._v_txt = None

    # ------------------------------------------------------------------------------- save and load
    @contextmanager
    def _text_only(self) -> Iterator[UNet2DConditionModel]:
        """The UNet with its plain processors, so that diffusers saves exactly the base model."""
        installed = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(dict(self._text_only_processors))
        try:
            yield self.unet
        finally:
            self.unet.set_attn_processor(installed)

    def image_branch_state_dict(self) -> dict[str, torch.Tensor]:
        """The image branch in diffusers' IP-Adapter layout (``image_proj.*``, ``ip_adapter.{i}.to_k_ip.*``)."""
        state: dict[str, torch.Tensor] = {}
        if self.image_projection is None:
            return state
        for key, value in self.image_projection.state_dict().items():
            state["image_proj." + key.replace("image_embeds.", "proj.")] = value
        for index, processor in enumerate(self.unet.attn_processors.values()):
            if isinstance(processor, IPAdapterAttnProcessor2_0):
                state[f"ip_adapter.{index}.to_k_ip.weight"] = processor.to_k_ip[0].weight
                state[f"ip_adapter.{index}.to_v_ip.weight"] = processor.to_v_ip[0].weight
        return state

    def load_image_branch_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`image_branch_state_dict`'s layout; any missing or unexpected key is an error."""
        own = self.image_branch_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise RuntimeError(
                "image-branch weights do not match this UNet: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        with torch.no_grad():
            for key, target in own.items():
                if target.shape != state[key].shape:
                    shapes = f"{tuple(state[key].shape)} != {tuple(target.shape)}"
                    raise RuntimeError(f"image-branch weight {key}: shape {shapes}")
                target.copy_(state[key])

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``unet/`` (diffusers format, safetensors) and the image branch beside it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._text_only() as unet:
            unet.save_pretrained(directory / "unet", safe_serialization=True)
        config = {
            "image_embed_dim": self.image_embed_dim,
            "num_image_tokens": self.num_image_tokens,
            "image_scale": self._image_scale,
        }
        (directory / EDIT_UNET_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if self.image_projection is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in self.image_branch_state_dict().items()}
            save_file(state, str(directory / IMAGE_BRANCH_WEIGHTS))

    @classmethod
    def from_pretrained(cls, directory: str | Path, torch_dtype: torch.dtype | None = None) -> EditUNet:
        """Load what :meth:`save_pretrained` wrote; fails loudly if the image branch is missing or partial."""
        directory = Path(directory)
        config_path = directory / EDIT_UNET_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a folder written by EditUNet.save_pretrained")
        config = json.loads(config_path.read_text())
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=torch_dtype)
        model = cls(unet, **config)
        if model.image_projection is not None:
            weights = directory / IMAGE_BRANCH_WEIGHTS
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} not found: the image branch's weights are missing")
            model.load_image_branch_state_dict(load_file(str(weights)))
        return model
