"""Stable Diffusion 1.x / 2.x: a UNet, one CLIP text encoder, DDPM noise (epsilon or v)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..inject import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS
from .base import Family

__all__ = ["SD"]


class _SD(Family):
    def denoiser_fits(self, denoiser: nn.Module) -> bool:
        return getattr(denoiser.config, "addition_embed_type", None) != "text_time"

    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], batch: Mapping[str, Any], device: Any
    ) -> dict[str, Any]:
        """``encoder_hidden_states``: the text encoder's last hidden state ``(B, 77, d)``."""
        states = encoders["text_encoder"](batch["input_ids"].to(device), return_dict=False)[0]
        return {"encoder_hidden_states": states}


SD = _SD(
    name="sd",
    title="Stable Diffusion 1.x/2.x",
    pipeline_classes=(
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionControlNetPipeline",
    ),  # fmt: skip
    denoiser="unet",
    denoiser_classes=("UNet2DConditionModel",),
    text_encoders=("text_encoder",),
    default_targets={"unet": tuple(UNET_ATTENTION_TARGETS), "text_encoder": tuple(TEXT_ENCODER_TARGETS)},
)
"""The Stable Diffusion 1.x / 2.x family."""
