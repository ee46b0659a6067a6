"""Dual classifier-free guidance sampling (InstructPix2Pix), with the three branches in one UNet call.

``ε = ε(∅,∅) + s_I·(ε(I,∅) − ε(∅,∅)) + s_T·(ε(I,T) − ε(I,∅))``: ``I`` is the source latent, ``T`` the
instruction's conditions (``f_txt`` and ``f_img``). ``v_txt`` goes to all three branches, as SmartEdit
does. The conditions are computed once per edit by the caller; only the UNet runs per step.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from insightedit.models.generation.edit_unet import EditUNet


def _step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | None, eta: float) -> dict[str, object]:
    parameters = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, object] = {}
    if "eta" in parameters:
        kwargs["eta"] = eta
    if "generator" in parameters:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def sample_with_dual_guidance(
    unet: EditUNet,
    scheduler: SchedulerMixin,
    source_latents: torch.Tensor,
    f_txt: torch.Tensor,
    null_f_txt: torch.Tensor,
    image_embeds: torch.Tensor | None = None,
    v_txt: torch.Tensor | None = None,
    text_guidance: float = 7.5,
    image_guidance: float = 1.5,
    num_inference_steps: int = 20,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Denoise from noise to the edited latent for each source latent (B, C, h, w).

    Args:
        f_txt: (B, L, D) the instruction's text condition; ``null_f_txt``: (1 or B, L, D) its null.
        image_embeds: (B, E) the IAA embedding, projected once to ``f_img``; the null is the projection
            of zeros. Ignored when the UNet has no image branch.
        v_txt: (B, C0, h, w) added after ``conv_in`` in every branch.
        latents: the starting noise; drawn with ``generator`` (diffusers' ``randn_tensor``) when ``None``.
    """
    batch = source_latents.shape[0]
    device, dtype = source_latents.device, f_txt.dtype
    scheduler.set_timesteps(num_inference_steps, device=device)
    if latents is None:
        shape = (batch, unet.latent_channels, *source_latents.shape[-2:])
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma

    null_f_txt = null_f_txt.expand(batch, -1, -1).to(dtype)
    text_states = torch.cat([f_txt, null_f_txt, null_f_txt])
    source_states = torch.cat([source_latents, source_latents, torch.zeros_like(source_latents)])
    f_img = None
    if unet.image_projection is not None:
        conditioned = unet.project_image_embeds(image_embeds, batch)
        null = unet.project_image_embeds(None, batch)
        f_img = torch.cat([conditioned, null, null])
    v_states = torch.cat([v_txt] * 3) if v_txt is not None else None
    step_kwargs = _step_kwargs(scheduler, generator, eta)

    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 3), t)
        prediction = unet(model_input, source_states, t, text_states, f_img=f_img, v_txt=v_states)
        with_text, with_image, unconditional = prediction.chunk(3)
        guided = (
            unconditional
            + text_guidance * (with_text - with_image)
            + image_guidance * (with_image - unconditional)
        )
        latents = scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]
    return latents
