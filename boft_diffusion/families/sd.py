"""Stable Diffusion 1.x / 2.x: a UNet, one CLIP text encoder, DDPM noise (epsilon or v)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..inject import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS
from .base import Family, SingleFileLayout
from .keys.sd import sd_single_file

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

    def tiny_pipeline(
        self, seed: int = 0, *, weights: str | None = None, prediction_type: str | None = None
    ) -> Any:
        """The embedded default (:func:`~boft_diffusion.tiny.build_tiny_pipeline`): by default its world weights,
        which predict noise; ``weights`` may also name a file of :func:`~boft_diffusion.tiny.save_world_weights`."""
        from ..tiny import build_tiny_pipeline

        return build_tiny_pipeline(
            seed, prediction_type=prediction_type or "epsilon", weights=weights or self.tiny_weights[0]
        )


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
    tiny_builder="build_tiny_pipeline",
    default_targets={"unet": tuple(UNET_ATTENTION_TARGETS), "text_encoder": tuple(TEXT_ENCODER_TARGETS)},
    tiny_weights=("world", "random"),
    pipeline_options={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    controlnet_pipeline="StableDiffusionControlNetPipeline",
    single_file=SingleFileLayout(("unet", "vae", "text_encoder"), sd_single_file),
)
"""The Stable Diffusion 1.x / 2.x family."""
