"""SDXL: a UNet with added text-time conditioning, two CLIP text encoders, DDPM noise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..inject import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS
from .base import Family, SingleFileLayout
from .keys.sdxl import sdxl_single_file

__all__ = ["SDXL", "time_ids"]


def time_ids(
    original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning ``(B, 6)``: original (h, w), crop (top, left), target (h, w) per sample."""
    target = torch.tensor(target_size, dtype=original_sizes.dtype).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1)


class _SDXL(Family):
    def denoiser_fits(self, denoiser: nn.Module) -> bool:
        return getattr(denoiser.config, "addition_embed_type", None) == "text_time"

    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], batch: Mapping[str, Any], device: Any
    ) -> dict[str, Any]:
        """As ``StableDiffusionXLPipeline.encode_prompt``: each encoder's penultimate hidden state,
        concatenated ``(B, 77, d1 + d2)``; the second encoder's projected pooled output as ``text_embeds``;
        the size / crop ``time_ids`` (:meth:`add_batch_conditioning`)."""
        states, pooled = [], None
        for name, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2")):
            out = encoders[name](batch[key].to(device), output_hidden_states=True, return_dict=True)
            states.append(out.hidden_states[-2])
            if name == "text_encoder_2":
                pooled = out.text_embeds
        conditioning = {
            "encoder_hidden_states": torch.cat(states, dim=-1),
            "added_cond_kwargs": {"text_embeds": pooled},
        }
        return self.add_batch_conditioning(conditioning, batch, device)

    def add_batch_conditioning(
        self, conditioning: dict[str, Any], batch: Mapping[str, Any], device: Any
    ) -> dict[str, Any]:
        """The size / crop ``time_ids`` ``(B, 6)`` in ``added_cond_kwargs``: the batch's ``original_sizes`` and
        ``crop_top_lefts`` (``(B, 2)`` each; without them the image's own size, uncropped) and its image size."""
        added = conditioning["added_cond_kwargs"]
        pooled = added["text_embeds"]
        size = tuple(batch["pixel_values"].shape[-2:])
        n = pooled.shape[0]
        original = batch.get("original_sizes", torch.tensor([size] * n))
        crops = batch.get("crop_top_lefts", torch.zeros(n, 2, dtype=torch.long))
        ids = time_ids(torch.as_tensor(original), torch.as_tensor(crops), size).to(device, pooled.dtype)
        return {**conditioning, "added_cond_kwargs": {**added, "time_ids": ids}}


SDXL = _SDXL(
    name="sdxl",
    title="Stable Diffusion XL",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    denoiser="unet",
    denoiser_classes=("UNet2DConditionModel",),
    text_encoders=("text_encoder", "text_encoder_2"),
    tiny_builder="build_tiny_sdxl_pipeline",
    per_batch_conditioning=("added_cond_kwargs.time_ids",),
    default_targets={
        "unet": tuple(UNET_ATTENTION_TARGETS),
        "text_encoder": tuple(TEXT_ENCODER_TARGETS),
        "text_encoder_2": tuple(TEXT_ENCODER_TARGETS),
    },
    pipeline_options={"add_watermarker": False},
    controlnet_pipeline="StableDiffusionXLControlNetPipeline",
    single_file=SingleFileLayout(("unet", "vae", "text_encoder", "text_encoder_2"), sdxl_single_file),
)
"""The SDXL family (base 1.0 shape: two CLIP encoders, pooled text embeddings, size / crop time ids)."""
