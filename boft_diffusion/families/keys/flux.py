"""Diffusers -> original (Black Forest Labs) FLUX.1 single-file key layout.

The exact inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
(``diffusers/loaders/single_file_utils.py``): ``to_flux_original_layout`` maps a
``FluxTransformer2DModel`` state dict to the keys of BFL's ``flux1-dev.safetensors`` /
``flux1-schnell.safetensors`` (no ``model.diffusion_model.`` prefix), the transformer-only file that
ComfyUI, Forge and ``FluxTransformer2DModel.from_single_file`` read. VAE and text encoders are not
part of it (separate files there). Pure key bookkeeping: renames, concatenations along dim 0 and one
half swap -- no arithmetic, so a round trip is bit-exact.

- ``time_text_embed.{timestep,text,guidance}_embedder.linear_{1,2}`` -> ``{time,vector,guidance}_in.
  {in,out}_layer``; ``context_embedder`` -> ``txt_in``; ``x_embedder`` -> ``img_in``.
- double block ``transformer_blocks.N`` -> ``double_blocks.N``: ``norm1{,_context}.linear`` ->
  ``{img,txt}_mod.lin``; ``attn.to_{q,k,v}`` / ``attn.add_{q,k,v}_proj`` concatenated (q, k, v) ->
  ``{img,txt}_attn.qkv``; ``attn.norm_{q,k}`` / ``attn.norm_added_{q,k}`` ->
  ``{img,txt}_attn.norm.{query,key}_norm.scale``; ``attn.to_out.0`` / ``attn.to_add_out`` ->
  ``{img,txt}_attn.proj``; ``ff{,_context}.net.0.proj`` / ``.net.2`` -> ``{img,txt}_mlp.0`` / ``.2``.
- single block ``single_transformer_blocks.N`` -> ``single_blocks.N``: ``norm.linear`` ->
  ``modulation.lin``; ``attn.to_{q,k,v}`` and ``proj_mlp`` concatenated (q, k, v, mlp) -> ``linear1``;
  ``attn.norm_{q,k}`` -> ``norm.{query,key}_norm.scale``; ``proj_out`` -> ``linear2``.
- ``proj_out`` -> ``final_layer.linear``; ``norm_out.linear`` -> ``final_layer.adaLN_modulation.1``
  with its halves swapped back (diffusers' ``AdaLayerNormContinuous`` splits scale, shift; BFL's
  ``LastLayer`` shift, scale).

Caveat (diffusers, not this file): the converter splits ``linear1`` with FLUX.1's width hard-coded
(``inner_dim = 3072``, ``mlp_ratio = 4``), so diffusers can load back only full-width files; the
layout itself holds any width (ComfyUI reads widths from the shapes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["flux_single_file", "to_flux_original_layout"]

_TOP = {
    "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
    "context_embedder.": "txt_in.",
    "x_embedder.": "img_in.",
    "proj_out.": "final_layer.linear.",
}
_SWAPPED = {"norm_out.linear.": "final_layer.adaLN_modulation.1."}
_DOUBLE = {
    "norm1.linear.": "img_mod.lin.",
    "norm1_context.linear.": "txt_mod.lin.",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0.": "img_attn.proj.",
    "attn.to_add_out.": "txt_attn.proj.",
    "ff.net.0.proj.": "img_mlp.0.",
    "ff.net.2.": "img_mlp.2.",
    "ff_context.net.0.proj.": "txt_mlp.0.",
    "ff_context.net.2.": "txt_mlp.2.",
}
_DOUBLE_FUSED = {  # original prefix: diffusers parts, in concatenation order
    "img_attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
    "txt_attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
}
_SINGLE = {
    "norm.linear.": "modulation.lin.",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "proj_out.": "linear2.",
}
_SINGLE_FUSED = {"linear1.": ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_PARAMS = ("weight", "bias")


def _no_place(key: str) -> ValueError:
    return ValueError(
        f"transformer key {key!r} has no place in the original FLUX.1 (Black Forest Labs) layout"
    )


def _rename(rest: str, table: Mapping[str, str]) -> str | None:
    """``rest`` through the first prefix (or whole key) of ``table`` it matches; ``None`` if none does."""
    for src, dst in table.items():
        if rest == src or (src.endswith(".") and rest.startswith(src) and rest[len(src) :] in _PARAMS):
            return dst + rest[len(src) :] if src.endswith(".") else dst
    return None


def _fused_part(rest: str, fused: Mapping[str, tuple[str, ...]]) -> tuple[str, str] | None:
    """``(original param key, diffusers part)`` if ``rest`` is one part of a fused original tensor."""
    for dst, parts in fused.items():
        for part in parts:
            if rest.startswith(part) and rest[len(part) :] in _PARAMS:
                return dst + rest[len(part) :], part
    return None


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' ``swap_scale_shift`` (its own inverse): the two halves of dim 0 exchanged."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_flux_original_layout(transformer: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel`` state dict -> BFL's original FLUX.1 keys (see the module docstring).

    A key no mapping covers raises ``ValueError`` naming it, as does a fused tensor missing a part.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # original key -> {diffusers part: tensor}
    order: dict[str, tuple[str, ...]] = {}
    for key, tensor in transformer.items():
        match = _BLOCK.fullmatch(key)
        if match is None:
            if (name := _rename(key, _TOP)) is not None:
                out[name] = tensor
            elif (name := _rename(key, _SWAPPED)) is not None:
                out[name] = _swap_halves(tensor)
            else:
                raise _no_place(key)
            continue
        kind, index, rest = match.groups()
        double = kind == "transformer_blocks"
        prefix = f"{'double' if double else 'single'}_blocks.{index}."
        table, fused_table = (_DOUBLE, _DOUBLE_FUSED) if double else (_SINGLE, _SINGLE_FUSED)
        if (name := _rename(rest, table)) is not None:
            out[prefix + name] = tensor
        elif (hit := _fused_part(rest, fused_table)) is not None:
            name, part = hit
            fused.setdefault(prefix + name, {})[part] = tensor
            order[prefix + name] = fused_table[name.rsplit(".", 1)[0] + "."]
        else:
            raise _no_place(key)
    for name, parts in fused.items():
        missing = [p for p in order[name] if p not in parts]
        if missing:
            param = name.rsplit(".", 1)[1]
            raise ValueError(f"{name} needs {', '.join(p + param for p in order[name])}; missing {missing}")
        out[name] = torch.cat([parts[p] for p in order[name]], dim=0)
    return out


def flux_single_file(
    states: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """:func:`to_flux_original_layout` of a Flux pipeline's ``{"transformer": state dict}`` (the file holds
    the transformer only; ``configs`` is unused)."""
    return to_flux_original_layout(states["transformer"])
