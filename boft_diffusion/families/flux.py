"""FLUX.1: a transformer on packed 2x2 latent patches, CLIP pooled plus T5, guidance embedding, flow matching."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..inject import TEXT_ENCODER_TARGETS
from .base import Family, SingleFileLayout
from .keys.flux import flux_single_file
from .sd3 import JOINT_ATTENTION_TARGETS, T5_TARGETS

__all__ = ["FLUX", "pack", "unpack"]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` latents -> ``(B, h/2 * w/2, 4C)`` tokens of 2x2 patches (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return (
        latents.view(b, c, h // 2, 2, w // 2, 2)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(b, (h // 2) * (w // 2), c * 4)
    )


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for ``(h, w)`` latents."""
    b, _, channels = tokens.shape
    return (
        tokens.view(b, h // 2, w // 2, channels // 4, 2, 2)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(b, channels // 4, h, w)
    )


def image_ids(h: int, w: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Position ids ``(h/2 * w/2, 3)`` of the packed patches (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class _Flux(Family):
    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], batch: Mapping[str, Any], device: Any
    ) -> dict[str, Any]:
        """As ``FluxPipeline.encode_prompt``: CLIP's pooled output and T5's last hidden state."""
        clip = encoders["text_encoder"](
            batch[self.token_key("text_encoder")].to(device), output_hidden_states=False
        )
        t5 = encoders["text_encoder_2"](batch[self.token_key("text_encoder_2")].to(device))[0]
        return {"encoder_hidden_states": t5, "pooled_projections": clip.pooler_output}

    def denoise(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, Any],
        guidance_scale: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Packs the latents, calls the transformer with timesteps / 1000 (and the guidance embedding when it
        has one), unpacks the prediction."""
        b, _, h, w = noisy.shape
        states = conditioning["encoder_hidden_states"]
        guidance = None
        if getattr(extract_model_from_parallel(denoiser).config, "guidance_embeds", False):  # DDP-wrapped too
            guidance = torch.full(
                (b,), 3.5 if guidance_scale is None else guidance_scale, device=noisy.device
            )
        pred = denoiser(
            hidden_states=pack(noisy), timestep=timesteps.to(noisy.dtype) / 1000, guidance=guidance,
            pooled_projections=conditioning["pooled_projections"], encoder_hidden_states=states,
            txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False,
        )[0]  # fmt: skip
        return unpack(pred, h, w)


FLUX = _Flux(
    name="flux",
    title="FLUX.1",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
    denoiser="transformer",
    denoiser_classes=("FluxTransformer2DModel",),
    text_encoders=("text_encoder", "text_encoder_2"),
    tiny_builder="build_tiny_flux_pipeline",
    default_targets={
        "transformer": JOINT_ATTENTION_TARGETS,
        "text_encoder": tuple(TEXT_ENCODER_TARGETS),
        "text_encoder_2": T5_TARGETS,
    },
    objective="flow",
    trainable_text_encoders=("text_encoder",),
    max_sequence_length=512,
    # BFL's transformer-only file; the VAE and text encoders must be there, unadapted, and are not written
    single_file=SingleFileLayout(
        ("transformer", "vae", "text_encoder", "text_encoder_2"), flux_single_file, holds=("transformer",)
    ),
)
"""The FLUX.1 family (dev / schnell shape; diffusers' DreamBooth script: T5 at 512 tokens, CLIP trainable)."""
