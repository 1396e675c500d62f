"""Diffusers -> original (CompVis/LDM) Stable Diffusion 1.x/2.x single-file key layout.

The exact inverse of diffusers' single-file converters: ``to_original_layout`` maps the UNet, VAE and
text-encoder state dicts of a diffusers pipeline to the one state dict that ComfyUI, AUTOMATIC1111 and
``StableDiffusionPipeline.from_single_file`` read. Pure key (and shape) bookkeeping: no file, no
pipeline. Other model families get a module of their own beside this one; :func:`sd_single_file` is
the :class:`~boft_diffusion.families.base.SingleFileLayout` hook of :data:`~boft_diffusion.families.SD`.

The text encoder is written as the original model held it, decided from its config
(:func:`is_open_clip`): SD 1.x's OpenAI CLIP ViT-L (``quick_gelu``) under
``cond_stage_model.transformer.text_model.`` with its transformers names; SD 2.x's OpenCLIP ViT-H text
tower (exact ``gelu``) in open_clip form under ``cond_stage_model.model.`` (:func:`open_clip_layout`,
which SDXL's second encoder shares).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "CLIP_PREFIX",
    "OPEN_CLIP_PREFIX",
    "is_open_clip",
    "open_clip_layout",
    "sd_single_file",
    "to_original_layout",
]

CLIP_PREFIX = "cond_stage_model.transformer.text_model."
"""Where SD 1.x's CLIP ViT-L keys go (transformers names)."""
OPEN_CLIP_PREFIX = "cond_stage_model.model."
"""Where SD 2.x's OpenCLIP ViT-H keys go (open_clip names); diffusers detects the tower by
``cond_stage_model.model.token_embedding.weight``."""

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


_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def _config_value(config: Any, name: str) -> Any:
    """``config[name]`` of a mapping (diffusers) or ``config.name`` of an object (transformers)."""
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def is_open_clip(text_encoder_config: Any) -> bool:
    """Whether a transformers ``CLIPTextConfig`` is an OpenCLIP text tower (written in open_clip layout).

    OpenCLIP's towers (SD 2.x's ViT-H, SDXL's ViT-bigG; diffusers' configs for them say
    ``hidden_act="gelu"``) use exact GELU; OpenAI's CLIP (SD 1.x's ViT-L) uses ``quick_gelu``. Decided from
    the activation, which fixes what the original model computes, not from a width or a name.
    """
    return _config_value(text_encoder_config, "hidden_act") == "gelu"


def open_clip_layout(
    text_encoder: Mapping[str, torch.Tensor],
    prefix: str,
    component: str = "text_encoder",
    layout: str = "Stable Diffusion",
) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` / ``CLIPTextModelWithProjection`` keys -> open_clip keys under ``prefix``.

    The inverse of diffusers' ``convert_open_clip_checkpoint``: ``token_embedding.weight``,
    ``positional_embedding``, ``transformer.resblocks.N.{ln_1, ln_2, attn.in_proj_weight,
    attn.in_proj_bias, attn.out_proj, mlp.c_fc, mlp.c_proj}`` (``in_proj`` is q, k and v stacked in that
    order: new, concatenated tensors), ``ln_final`` and, when the model has one, ``text_projection``
    (stored as open_clip multiplies by it, ``x @ P``: a transposed view of the ``nn.Linear`` weight).
    Keys may carry transformers' ``text_model.`` wrapper or not; transformers' ``position_ids`` buffer is
    dropped (open_clip has none). One block per layer the model has: nothing is invented for layers it
    lacks. A key with no place is a ``ValueError`` naming ``component``, the key and ``layout``.
    """
    out, qkv = {}, {}
    for key, tensor in text_encoder.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue  # a transformers buffer (older versions); open_clip has none
        if name in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[name]] = tensor
            continue
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T
            continue
        parts = name.split(".")  # encoder.layers.N.<module...>.<weight|bias>
        if len(parts) < 5 or parts[:2] != ["encoder", "layers"] or parts[-1] not in ("weight", "bias"):
            raise ValueError(f"{component} key {key!r} has no place in the original {layout} layout")
        layer, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        block = f"{prefix}transformer.resblocks.{layer}."
        if module in _OPEN_CLIP_LAYER:
            out[f"{block}{_OPEN_CLIP_LAYER[module]}.{kind}"] = tensor
        elif module.startswith("self_attn.") and module.removeprefix("self_attn.") in _QKV:
            qkv.setdefault(f"{block}attn.in_proj_{kind}", {})[module.removeprefix("self_attn.")] = tensor
        else:
            raise ValueError(f"{component} key {key!r} has no place in the original {layout} layout")
    for fused, parts in qkv.items():
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise ValueError(f"{component}: {fused} needs q, k and v projections; {missing} missing")
        out[fused] = torch.cat([parts[p] for p in _QKV])
    return out


def to_original_layout(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoder_config: Any = None,
) -> dict[str, torch.Tensor]:
    """Diffusers state dicts of an SD 1.x/2.x pipeline -> one original (CompVis/LDM) state dict.

    UNet keys get ``model.diffusion_model.``, VAE keys ``first_stage_model.`` (mid-block attention
    weights as 1x1 convolutions, as the original stores them). The text encoder by its config
    (:func:`is_open_clip`; ``None``: CLIP): SD 1.x's CLIP keys under ``CLIP_PREFIX``
    (``cond_stage_model.transformer.text_model.``), SD 2.x's OpenCLIP tower in open_clip layout under
    ``OPEN_CLIP_PREFIX`` (``cond_stage_model.model.``, :func:`open_clip_layout`). Exact inverse of
    diffusers' single-file converters.
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
    if text_encoder_config is not None and is_open_clip(text_encoder_config):
        out.update(open_clip_layout(text_encoder, OPEN_CLIP_PREFIX))
    else:
        for key, tensor in text_encoder.items():
            out[f"{CLIP_PREFIX}{key.removeprefix('text_model.')}"] = tensor
    return out


def sd_single_file(
    states: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """:func:`to_original_layout` of an SD pipeline's ``{component: state dict}`` and ``{component: config}``
    (``unet``, ``vae``, ``text_encoder``; the text encoder's config decides its layout)."""
    return to_original_layout(
        states["unet"], states["vae"], states["text_encoder"],
        configs["unet"], configs["vae"], configs["text_encoder"],
    )  # fmt: skip
