"""Diffusers -> original (CompVis/LDM) Stable Diffusion 1.x/2.x single-file key layout.

The exact inverse of diffusers' single-file converters: ``to_original_layout`` maps the UNet, VAE and
CLIP text-encoder state dicts of a diffusers pipeline to the one state dict that ComfyUI,
AUTOMATIC1111 and ``StableDiffusionPipeline.from_single_file`` read. Pure key (and shape) bookkeeping:
no file, no pipeline. Other model families get a module of their own beside this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["to_original_layout"]

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(key: str, per_block: int, up_has_attention: set[int]) -> str:
    """diffusers UNet2DConditionModel key -> LDM ``UNetModel`` key (inverse of diffusers' converter)."""
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        slot = 1 if kind == "attentions" else 2 * index
        return ".".join(["middle_block", str(slot), *_resnet_rest(kind, rest)])
    if parts[0] in ("down_blocks", "up_blocks"):
        block, kind = int(parts[1]), parts[2]
        down = parts[0] == "down_blocks"
        width = per_block + 1
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.* -> input_blocks.i.0.op.*
            return ".".join(["input_blocks", str(1 + block * width + per_block), "0.op", *parts[5:]])
        if kind == "upsamplers":  # up_blocks.b.upsamplers.0.conv.* -> output_blocks.i.{1|2}.conv.*
            slot = 2 if block in up_has_attention else 1
            return ".".join(["output_blocks", str(block * width + per_block), str(slot), *parts[4:]])
        layer, rest = int(parts[3]), parts[4:]
        index = 1 + block * width + layer if down else block * width + layer
        slot = "1" if kind == "attentions" else "0"
        return ".".join(
            ["input_blocks" if down else "output_blocks", str(index), slot, *_resnet_rest(kind, rest)]
        )
    raise ValueError(f"UNet key {key!r} has no place in the original Stable Diffusion layout")


def _resnet_rest(kind: str, rest: list[str]) -> list[str]:
    if kind != "resnets":
        return rest
    return [_UNET_RESNET.get(rest[0], rest[0]), *rest[1:]]


def _vae_key(key: str, num_up: int) -> str:
    """diffusers AutoencoderKL key -> LDM ``AutoencoderKL`` key."""
    for new, old in _VAE_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    parts = key.split(".")
    if len(parts) < 3 or parts[1] not in ("down_blocks", "up_blocks", "mid_block"):
        return key  # conv_in, conv_out, quant_conv, post_quant_conv
    side, kind = parts[0], parts[1]
    if kind == "mid_block":
        if parts[2] == "attentions":
            name = ".".join(parts[4:-1])
            return f"{side}.mid.attn_1.{_VAE_ATTENTION[name]}.{parts[-1]}"
        return ".".join([side, f"mid.block_{int(parts[3]) + 1}", *_vae_resnet(parts[4:])])
    block = int(parts[2]) if kind == "down_blocks" else num_up - 1 - int(parts[2])
    stage = "down" if kind == "down_blocks" else "up"
    if parts[3] in ("downsamplers", "upsamplers"):
        return ".".join(
            [side, stage, str(block), "downsample" if stage == "down" else "upsample", *parts[5:]]
        )
    return ".".join([side, stage, str(block), "block", parts[4], *_vae_resnet(parts[5:])])


def _vae_resnet(rest: list[str]) -> list[str]:
    return ["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]]


def to_original_layout(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Diffusers state dicts of an SD 1.x-style pipeline -> one original (CompVis/LDM) state dict.

    UNet keys get ``model.diffusion_model.``, VAE keys ``first_stage_model.`` (mid-block attention
    weights as 1x1 convolutions, as the original stores them), CLIP keys
    ``cond_stage_model.transformer.text_model.``. Exact inverse of diffusers' single-file converters.
    """
    per_block = unet_config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"single_file export needs one layers_per_block for all blocks, got {per_block}")
    up_attention = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.") and ".attentions." in k}
    out = {f"model.diffusion_model.{_unet_key(k, per_block, up_attention)}": t for k, t in unet.items()}
    num_up = len(vae_config["up_block_types"])
    for key, tensor in vae.items():
        new = _vae_key(key, num_up)
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[f"first_stage_model.{new}"] = tensor
    for key, tensor in text_encoder.items():
        out[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = tensor
    return out
