"""Sampling under control: a light control encoder through the stock pipeline, or a ControlNet through the
family's stock ControlNet pipeline; both through :func:`~boft_diffusion.sampling.seeded_images`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..sampling import seeded_images
from .encoder import light_control

__all__ = ["control_tensor", "controlnet_pipeline", "residuals_in", "sample_with_control"]


def control_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """Control images as a ``(B, 3, size, size)`` float batch in [0, 1] (RGB, resized bilinearly)."""
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)


def controlnet_pipeline(pipe: Any, controlnet: nn.Module | None = None) -> Any:
    """The stock ControlNet pipeline of ``pipe``'s family sharing its modules (nothing copied): the family's
    ``controlnet_pipeline`` class (``StableDiffusionControlNetPipeline`` for SD 1.x/2.x,
    ``StableDiffusionXLControlNetPipeline`` for SDXL) built with its ``pipeline_options``.

    ``controlnet`` defaults to ``pipe.controlnet``; ``pipe`` may already be such a pipeline.
    """
    from ..families import FAMILIES, family_of

    controlnet = controlnet if controlnet is not None else getattr(pipe, "controlnet", None)
    if controlnet is None:
        raise ValueError("the pipeline has no ControlNet: pass one or train with control.mode=controlnet")
    family = family_of(pipe)
    kind = family.controlnet_pipeline_class()
    if kind is None:
        supported = [f.name for f in FAMILIES.values() if f.controlnet_pipeline is not None]
        raise ValueError(
            f"ControlNet sampling supports {' and '.join(supported)} pipelines, not {family.title}"
        )
    if isinstance(pipe, kind) and pipe.controlnet is controlnet:
        return pipe
    modules = {
        name: getattr(pipe, name) for name in ("vae", family.denoiser, "scheduler", *family.text_encoders)
    }
    modules |= family.tokenizers(pipe)
    wrapped = kind(**modules, controlnet=controlnet, **family.pipeline_options)
    wrapped.set_progress_bar_config(disable=True)
    return wrapped


@torch.no_grad()
def sample_with_control(
    pipe: Any,
    prompts: list[str],
    conditions: list[Image.Image],
    seeds: list[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    conditioning_scale: float = 1.0,
    resolution: int | None = None,
) -> list[Image.Image]:
    """One image per ``(prompt, control image, seed)``, through whichever control the pipeline has.

    A light control encoder (:func:`light_control`) samples with the stock pipeline under
    :meth:`LightControl.conditioned`; a ControlNet (``pipe.controlnet``) through the stock
    ``StableDiffusionControlNetPipeline``. Image ``i`` starts from seed ``seeds[i]``
    (:func:`~boft_diffusion.sampling.seeded_images`).
    """
    if not (len(prompts) == len(conditions) == len(seeds)) or not prompts:
        raise ValueError(
            f"give one control image and one seed per prompt (got {len(prompts)} prompts, "
            f"{len(conditions)} control images, {len(seeds)} seeds)"
        )
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    common = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=size, width=size,
        output_type="pil",
    )  # fmt: skip
    control = light_control(pipe)
    if control is not None:
        condition = control_tensor(conditions, size)
        with control.conditioned(condition):
            return seeded_images(pipe, prompts, seeds, **common)
    if getattr(pipe, "controlnet", None) is None:
        raise ValueError(
            "this pipeline has no control (no light control encoder, no ControlNet): load an adapter trained "
            "with `boft-diffusion train controlnet`, or sample without a control image"
        )
    images = [c.convert("RGB").resize((size, size), Image.BILINEAR) for c in conditions]
    with residuals_in(pipe.controlnet, pipe.unet.dtype):
        return seeded_images(
            controlnet_pipeline(pipe), prompts, seeds, **common, image=images,
            controlnet_conditioning_scale=conditioning_scale,
        )  # fmt: skip


@contextmanager
def residuals_in(controlnet: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Cast the ControlNet's residuals to the UNet's ``dtype`` inside the block.

    A ControlNet trained with float32 parts next to a bf16 / fp16 UNet returns float32 residuals; the
    stock pipeline adds them to the UNet's features unchanged, which promotes those to float32 ahead of
    the UNet's half-precision norms (diffusers' own training script casts them the same way).
    """

    def cast(module: nn.Module, args: Any, output: Any) -> Any:
        down, mid = output[0], output[1]
        return ([d.to(dtype) for d in down], mid.to(dtype), *output[2:])

    handle = controlnet.register_forward_hook(cast)
    try:
        yield
    finally:
        handle.remove()
