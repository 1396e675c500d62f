"""Stable Diffusion 3 / 3.5: an MMDiT transformer, two CLIP encoders and T5, flow matching."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..inject import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS
from .base import Family

__all__ = ["JOINT_ATTENTION_TARGETS", "SD3", "T5_TARGETS"]

JOINT_ATTENTION_TARGETS = (*UNET_ATTENTION_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""A joint (MMDiT) attention's image and text projections."""
T5_TARGETS = ("q", "k", "v", "o")
"""T5 attention projections."""


class _SD3(Family):
    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], batch: Mapping[str, Any], device: Any
    ) -> dict[str, Any]:
        """As ``StableDiffusion3Pipeline.encode_prompt``: both CLIPs' penultimate states concatenated and
        zero-padded to T5's width, followed along the sequence by T5's last state; the pooled vector is
        the two CLIP projections concatenated."""
        clip, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            out = encoders[name](batch[self.token_key(name)].to(device), output_hidden_states=True)
            pooled.append(out[0])
            clip.append(out.hidden_states[-2])
        t5 = encoders["text_encoder_3"](batch[self.token_key("text_encoder_3")].to(device))[0]
        states = torch.cat(clip, dim=-1)
        states = F.pad(states, (0, t5.shape[-1] - states.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([states, t5.to(states.dtype)], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def denoise(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, Any],
        guidance_scale: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        return denoiser(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"], return_dict=False,
        )[0]  # fmt: skip


SD3 = _SD3(
    name="sd3",
    title="Stable Diffusion 3/3.5",
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    denoiser="transformer",
    denoiser_classes=("SD3Transformer2DModel",),
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    tiny_builder="build_tiny_sd3_pipeline",
    default_targets={
        "transformer": JOINT_ATTENTION_TARGETS,
        "text_encoder": tuple(TEXT_ENCODER_TARGETS),
        "text_encoder_2": tuple(TEXT_ENCODER_TARGETS),
        "text_encoder_3": T5_TARGETS,
    },
    objective="flow",
    trainable_text_encoders=("text_encoder", "text_encoder_2"),
    max_sequence_length=77,
)
"""The SD3 / SD3.5 family (diffusers' DreamBooth script: T5 at 77 tokens, CLIPs trainable, T5 frozen)."""
