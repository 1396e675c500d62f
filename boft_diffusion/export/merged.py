"""Merged weights, computed without touching the pipeline.

``merged_state_dict`` gives a module's state dict as the stock (un-adapted) module has it, with the
active adapters folded in: ``W' = (W M^T) ⊙ s`` per adapted layer, in new tensors, deterministically
(dropout is training-only) whatever the module's train/eval mode; every other tensor is shared, not
copied. ``merged_pipeline`` builds a new pipeline of stock modules holding those weights.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..inject import boft_layers, stock_state_dict
from ..layers import BOFTLayer

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
    state = stock_state_dict(module)
    for path, layer in layers.items():
        state.update(_merged_tensors(path, layer, dtype))
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
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
            config = {k: v for k, v in module.config.items() if k != "_use_default_values"}
            fresh = type(module).from_config(config)
        elif isinstance(module, PreTrainedModel):
            fresh = type(module)(module.config)
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
