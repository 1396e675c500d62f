"""Diffusers -> original (Stability ``sgm``) Stable Diffusion XL single-file key layout.

The inverse of diffusers' single-file converters for SDXL (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``
with the ``conditioner.embedders.1.model.`` prefix): ``to_sdxl_original_layout`` maps the UNet, VAE
and both text-encoder state dicts of an SDXL pipeline to the one state dict that ComfyUI,
AUTOMATIC1111 and ``StableDiffusionXLPipeline.from_single_file`` read. Pure key (and shape)
bookkeeping: no file, no pipeline.

- UNet: the LDM ``UNetModel`` names of :mod:`.sd` under ``model.diffusion_model.``, plus the
  added text-time embedding ``add_embedding.linear_{1,2}`` as ``label_emb.0.{0,2}``.
- VAE: as SD, under ``first_stage_model.``.
- First text encoder (CLIP ViT-L, a transformers ``CLIPTextModel``): its own names under
  ``conditioner.embedders.0.transformer.text_model.``.
- Second text encoder (OpenCLIP ViT-bigG, a ``CLIPTextModelWithProjection``): the open_clip names under
  ``conditioner.embedders.1.model.`` -- ``token_embedding.weight``, ``positional_embedding``,
  ``transformer.resblocks.N.{ln_1, ln_2, attn.in_proj_*, attn.out_proj, mlp.c_fc, mlp.c_proj}``
  (``in_proj`` is q, k and v stacked in that order), ``ln_final`` and ``text_projection`` (stored as
  open_clip multiplies by it, ``x @ P``: the transpose of the ``nn.Linear`` weight); the mapping is
  :func:`.sd.open_clip_layout`, which SD 2.x's OpenCLIP-H text encoder shares.

Not written: open_clip's ``logit_scale`` (no part of text conditioning; diffusers has no such tensor,
and ComfyUI, AUTOMATIC1111 and diffusers load without it) and ``position_ids`` buffers of the second
encoder (open_clip has none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .sd import open_clip_layout, to_original_layout

__all__ = ["CLIP_G_PREFIX", "CLIP_L_PREFIX", "sdxl_single_file", "to_sdxl_original_layout"]

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
"""Where the first (CLIP ViT-L) text encoder's transformers keys go."""
CLIP_G_PREFIX = "conditioner.embedders.1.model."
"""Where the second (OpenCLIP ViT-bigG) text encoder's open_clip keys go."""

_ADD_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
_CLIP_L_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _no_place(component: str, key: str) -> ValueError:
    return ValueError(f"{component} key {key!r} has no place in the original Stable Diffusion XL layout")


def _clip_l(text_encoder: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` keys (with or without transformers' ``text_model.`` wrapper) -> ``CLIP_L_PREFIX``."""
    out = {}
    for key, tensor in text_encoder.items():
        name = key.removeprefix("text_model.")
        if not name.startswith(_CLIP_L_ROOTS):
            raise _no_place("text_encoder", key)
        out[CLIP_L_PREFIX + name] = tensor
    return out


def _clip_g(text_encoder_2: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` keys -> open_clip keys under ``CLIP_G_PREFIX`` (q/k/v fused)."""
    return open_clip_layout(text_encoder_2, CLIP_G_PREFIX, "text_encoder_2", "Stable Diffusion XL")


def to_sdxl_original_layout(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    text_encoder_2: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Diffusers state dicts of an SDXL pipeline -> one original (``sgm``) SDXL state dict.

    UNet and VAE as :func:`~boft_diffusion.families.keys.sd.to_original_layout` (``model.diffusion_model.``,
    ``first_stage_model.``) with the added text-time embedding as ``label_emb.0.{0,2}``; the first CLIP
    under ``conditioner.embedders.0.transformer.text_model.``, the second in open_clip layout under
    ``conditioner.embedders.1.model.``. Renames share the input tensors; the fused ``in_proj`` tensors
    are new (concatenated) and ``text_projection`` is a transposed view. A key with no place in the
    layout is a ``ValueError`` naming it.
    """
    rest, added = {}, {}
    for key, tensor in unet.items():
        new = next((new for new in _ADD_EMBEDDING if key.startswith(new)), None)
        if new is None:
            rest[key] = tensor
        else:
            added[f"model.diffusion_model.{_ADD_EMBEDDING[new]}{key[len(new) :]}"] = tensor
    out = to_original_layout(rest, vae, {}, unet_config, vae_config)
    out.update(added)
    out.update(_clip_l(text_encoder))
    out.update(_clip_g(text_encoder_2))
    return out


def sdxl_single_file(
    states: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """:func:`to_sdxl_original_layout` of an SDXL pipeline's ``{component: state dict}`` and
    ``{component: config}`` (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``)."""
    return to_sdxl_original_layout(
        states["unet"], states["vae"], states["text_encoder"], states["text_encoder_2"],
        configs["unet"], configs["vae"],
    )  # fmt: skip
