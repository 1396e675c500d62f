"""FLUX.2 [klein]: a transformer on 2x2-patchified, batch-norm-normalised latents, conditioned on stacked
hidden states of a Qwen3 language model prompted through its chat template; flow matching."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .base import Family, component
from .sd3 import JOINT_ATTENTION_TARGETS

__all__ = [
    "FLUX2",
    "FLUX2_SINGLE_BLOCK_LIMIT",
    "FLUX2_TRANSFORMER_TARGETS",
    "QWEN3_TARGETS",
    "latent_ids",
    "patchify",
    "text_ids",
    "unpatchify",
]

FLUX2_SINGLE_BLOCK_LIMIT = 48
"""Single-stream blocks the default targets name (FLUX.2's largest transformer, dev, has 48; klein 4B
has 20, 9B 24)."""
FLUX2_TRANSFORMER_TARGETS = (
    *JOINT_ATTENTION_TARGETS,
    "to_qkv_mlp_proj",
    *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(FLUX2_SINGLE_BLOCK_LIMIT)),
)
"""The double-stream blocks' image and text attention projections (``to_q/k/v``, ``to_out.0``,
``add_q/k/v_proj``, ``to_add_out``) and the single-stream blocks' fused projections: ``to_qkv_mlp_proj``
(attention QKV and MLP input) and ``to_out`` (attention and MLP output, input width ``dim * (1 +
mlp_ratio)``). The single blocks' ``to_out`` is named per block, as diffusers' Flux.2 DreamBooth script
does: the suffix ``to_out`` alone would also name the double blocks' ``to_out`` ModuleList."""
QWEN3_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Qwen3 attention projections."""


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(B, C, H, W)`` -> ``(B, 4C, H/2, W/2)`` 2x2 patches as channels
    (``Flux2KleinPipeline._patchify_latents``)."""
    b, c, h, w = latents.shape
    return (
        latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    )


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`patchify` (``Flux2KleinPipeline._unpatchify_latents``)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def text_ids(batch_size: int, length: int, device: Any) -> torch.Tensor:
    """Position ids ``(B, L, 4)`` (t, h, w, l) = (0, 0, 0, i) of the text tokens
    (``Flux2KleinPipeline._prepare_text_ids``)."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(batch_size, -1, -1).to(device)


def latent_ids(batch_size: int, h: int, w: int, device: Any) -> torch.Tensor:
    """Position ids ``(B, h * w, 4)`` (t, h, w, l) = (0, row, column, 0) of the packed latent tokens
    (``Flux2KleinPipeline._prepare_latent_ids``)."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.unsqueeze(0).expand(batch_size, -1, -1).to(device)


def _bn_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent batch-norm mean and standard deviation ``(1, 4C, 1, 1)``, as ``like``."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        like.device, like.dtype
    )
    return mean, std


def normalise_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(B, C, H, W)`` -> patchified, batch-norm-normalised ``(B, 4C, H/2, W/2)``
    (``Flux2KleinPipeline._encode_vae_image`` after the encoder)."""
    latents = patchify(latents)
    mean, std = _bn_stats(vae, latents)
    return (latents - mean) / std


def denormalise_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`normalise_latents`: what ``Flux2KleinPipeline`` hands the VAE decoder."""
    mean, std = _bn_stats(vae, latents)
    return unpatchify(latents * std + mean)


@dataclass(frozen=True)
class _Flux2(Family):
    text_encoder_out_layers: tuple[int, ...] = (9, 18, 27)
    """Hidden states of the text encoder stacked into the conditioning (``Flux2KleinPipeline``'s default
    ``text_encoder_out_layers``; index 0 is the embeddings)."""

    def matches(self, pipe: Any) -> bool:
        """Also requires a Qwen3 text encoder in a bare component mapping (FLUX.2 [dev]'s ``Flux2Pipeline``
        has the same transformer class and a Mistral encoder)."""
        if not super().matches(pipe):
            return False
        if type(pipe).__name__ in self.pipeline_classes:
            return True
        return type(component(pipe, "text_encoder")).__name__.startswith("Qwen3")

    def tokenize(self, pipe: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """As ``Flux2KleinPipeline._get_qwen3_prompt_embeds``: each prompt as a user message through the chat
        template (generation prompt, thinking off), padded to ``max_sequence_length`` and truncated;
        ``input_ids`` and ``attention_mask`` ``(B, max_sequence_length)``."""
        tokenizer = component(pipe, "tokenizer")
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                enable_thinking=False,
            )
            for prompt in prompts
        ]  # fmt: skip
        out = tokenizer(
            texts,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_sequence_length,
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], batch: Mapping[str, Any], device: Any
    ) -> dict[str, Any]:
        """As ``Flux2KleinPipeline.encode_prompt``: the hidden states after layers
        :attr:`text_encoder_out_layers` (attention-masked), stacked along the features ``(B, L, n * d)``, and
        the text position ids ``txt_ids`` ``(B, L, 4)``."""
        encoder = encoders["text_encoder"]
        out = encoder(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            output_hidden_states=True, use_cache=False,
        )  # fmt: skip
        stacked = torch.stack([out.hidden_states[k] for k in self.text_encoder_out_layers], dim=1)
        b, n, length, d = stacked.shape
        states = stacked.permute(0, 2, 1, 3).reshape(b, length, n * d)
        return {"encoder_hidden_states": states, "txt_ids": text_ids(b, length, states.device)}

    def encode_latents(self, vae: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        """The posterior mode, 2x2-patchified and normalised by the VAE's latent batch-norm statistics,
        ``(B, 4C, H/2f, W/2f)``: as ``Flux2KleinPipeline`` encodes images (and diffusers' Flux.2 [klein]
        DreamBooth script its training images), the inverse of what it decodes."""
        posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return self.latents_from(vae, posterior)

    def latents_from(self, vae: Any, posterior: Any) -> torch.Tensor:
        """The posterior's mode, patchified and normalised (:meth:`encode_latents`)."""
        return normalise_latents(vae, posterior.mode())

    def denoise(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, Any],
        guidance_scale: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Packs the ``(B, 4C, h, w)`` latents into ``(B, h * w, 4C)`` tokens with their position ids, calls
        the transformer with timesteps / 1000 (and the guidance embedding only when it has one, as diffusers'
        Flux.2 DreamBooth script; klein has none and its pipeline passes none), unpacks the prediction."""
        b, c, h, w = noisy.shape
        guidance = None
        if getattr(extract_model_from_parallel(denoiser).config, "guidance_embeds", False):  # DDP-wrapped too
            guidance = torch.full(
                (b,), 3.5 if guidance_scale is None else guidance_scale, device=noisy.device
            )
        pred = denoiser(
            hidden_states=noisy.reshape(b, c, h * w).permute(0, 2, 1), timestep=timesteps.to(noisy.dtype) / 1000,
            guidance=guidance, encoder_hidden_states=conditioning["encoder_hidden_states"],
            txt_ids=conditioning["txt_ids"], img_ids=latent_ids(b, h, w, noisy.device), return_dict=False,
        )[0]  # fmt: skip
        return pred[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w)


FLUX2 = _Flux2(
    name="flux2",
    title="FLUX.2 [klein]",
    pipeline_classes=("Flux2KleinPipeline", "Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline"),
    denoiser="transformer",
    denoiser_classes=("Flux2Transformer2DModel",),
    text_encoders=("text_encoder",),
    tiny_builder="build_tiny_flux2_pipeline",
    default_targets={"transformer": FLUX2_TRANSFORMER_TARGETS, "text_encoder": QWEN3_TARGETS},
    objective="flow",
    trainable_text_encoders=(),
    max_sequence_length=512,
    call_arguments=(),  # Flux2KleinPipeline takes no negative prompt
)
"""The FLUX.2 [klein] family (4B / 9B, base or distilled: diffusers' Flux.2 [klein] DreamBooth script trains
the transformer only, Qwen3 prompts at 512 tokens)."""
