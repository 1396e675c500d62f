"""Merged weights, computed without touching the pipeline.

``merged_state_dict`` gives a module's state dict as the stock (un-adapted) module has it, with the
active adapters folded in: ``W' = (W M^T) ⊙ s`` per adapted layer, in new tensors, deterministically
(dropout is training-only) whatever the module's train/eval mode; every other tensor is shared, not
copied. ``merged_pipeline`` builds a new pipeline of stock modules holding those weights.

A quantized base (:mod:`~boft_diffusion.quantized`) is exported at full precision: every quantized layer's
weight is read back (dequantized) into the stock key, its library's extra tensors are dropped, and the
exported model's config no longer names a quantization, so stock loaders read plain weights.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from ..inject import boft_layers, stock_module_name, stock_state_dict
from ..layers import BOFTLayer
from ..quantized import dequantized_weight, is_quantized

__all__ = ["merged_pipeline", "merged_state_dict"]


@torch.no_grad()
def _merged_tensors(path: str, layer: BOFTLayer, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``{"<path>.weight": W', "<path>.bias": b'}`` of a layer's pending adapters, in ``dtype`` (default:
    the stock one), computed and checked by :meth:`~boft_diffusion.layers.BOFTLayer.plan_merge`.

    Empty when nothing is pending (the base tensors already are the answer). Raises ``ValueError``
    naming the layer if a merged value is not finite.
    """
    plan = layer.plan_merge(layer.pending_adapters(), path, dtype)  # None when nothing is pending
    if plan is None:
        return {}
    out = {f"{path}.weight": plan.weight}
    if plan.bias is not None:
        out[f"{path}.bias"] = plan.bias
    return out


@torch.no_grad()
def merged_state_dict(module: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``module``'s state dict as the stock (un-adapted) module has it, with active adapters merged.

    BOFT parameters are dropped, keys are the stock ones (:func:`~boft_diffusion.inject.stock_state_dict`),
    adapted weights become
    ``W' = (W M^T) ⊙ s`` and adapted biases ``b + w (b_a - b)`` (new tensors, computed deterministically
    whatever the module's train/eval mode), ``modules_to_save`` give their active copy. Every other tensor
    is the module's own (shared, not copied) unless ``dtype`` casts floating tensors. A non-finite merged
    tensor raises ``ValueError``.
    """
    layers = boft_layers(module)
    state = _dequantized(module, stock_state_dict(module))
    for path, layer in layers.items():
        state.update(_merged_tensors(path, layer, dtype))
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    return state


def _dequantized(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a stock state dict of ``module``) with every quantized layer's entries replaced by its
    weight at full precision and its bias."""
    for name, layer in module.named_modules():
        if not is_quantized(layer):
            continue
        path = stock_module_name(name)
        for key in [k for k in state if k.startswith(f"{path}.")]:
            del state[key]
        state[f"{path}.weight"] = dequantized_weight(layer)
        if layer.bias is not None:
            state[f"{path}.bias"] = layer.bias
    return state


def _stock_module(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh module of ``module``'s class (built on the meta device) holding exactly ``state``."""
    from accelerate import init_empty_weights
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    with init_empty_weights():
        if isinstance(module, ModelMixin):
            # Every key at its live value: from_config would reset the keys listed in
            # _use_default_values, even ones changed since by register_to_config (a VAE's
            # scaling_factor measured after construction), and the export would decode differently.
            # A quantized base is exported dequantized: its config no longer names the quantization.
            drop = ("_use_default_values", "quantization_config", "_pre_quantization_dtype")
            config = {k: v for k, v in module.config.items() if k not in drop}
            fresh = type(module).from_config(config)
        elif isinstance(module, PreTrainedModel):
            config = module.config
            if getattr(config, "quantization_config", None) is not None:
                config = copy.deepcopy(config)
                del config.quantization_config
            fresh = type(module)(config)
        else:
            raise TypeError(f"Cannot export a {type(module).__name__}: not a diffusers or transformers model")
    fresh.load_state_dict(state, strict=True, assign=True)
    return fresh.eval()


def merged_pipeline(pipe: Any, dtype: torch.dtype | None) -> Any:
    """A new pipeline of the same class: stock modules with merged weights, other components shared."""
    components = dict(pipe.components)
    for name, component in components.items():
        if isinstance(component, nn.Module):
            components[name] = _stock_module(component, merged_state_dict(component, dtype))
    params = inspect.signature(type(pipe).__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    kwargs.update({k: v for k, v in pipe.config.items() if k in params and k not in components})
    return type(pipe)(**kwargs)
