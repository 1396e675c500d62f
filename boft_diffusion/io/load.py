"""Adapters on a pipeline: ``save_boft_weights``, ``load_boft_weights`` and ``save_peft_adapter``.

Loading plans the adapter on every component (:func:`~boft_diffusion.inject.plan_adapter`) and checks
every target, shape and value (no NaN or inf) against the plan before the pipeline is touched, so a
file that does not fit leaves the pipeline exactly as it was. The tensors then go in through
:func:`~boft_diffusion.inject.load_adapter_state_dict`, the inverse of what saving took out; a trained
bias of an adapted layer goes into the adapter's own bias, never into the base layer's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..inject import AdapterPlan, adapter_configs, adapter_state_dict, check_adapter_state_dict, plan_adapter
from ..pipeline import apply_adapter_plans, pipeline_components
from .format import AdapterFile, AdapterFormatError, write_adapter
from .peft import write_peft_adapter
from .read import read_adapter

__all__ = ["get_boft_adapter", "load_boft_weights", "save_boft_weights", "save_peft_adapter"]


def get_boft_adapter(pipe: Any, adapter_name: str = "default") -> AdapterFile:
    """The trained tensors and configs of one adapter across the pipeline's components."""
    tensors, configs = {}, {}
    for comp, module in pipeline_components(pipe).items():
        if adapter_name in adapter_configs(module):
            tensors[comp] = adapter_state_dict(module, adapter_name)
            configs[comp] = adapter_configs(module)[adapter_name]
    if not configs:
        raise ValueError(f"No component of the pipeline holds a BOFT adapter named {adapter_name!r}")
    return AdapterFile(tensors, configs, adapter_name)


def save_boft_weights(
    pipe: Any,
    save_directory: str | os.PathLike,
    adapter_name: str = "default",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save one adapter as ``<save_directory>/boft_weights.safetensors`` (atomic). Returns the file."""
    adapter = get_boft_adapter(pipe, adapter_name)
    adapter.metadata = dict(metadata or {})
    return write_adapter(adapter, save_directory)


def save_peft_adapter(pipe: Any, save_directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` in PEFT's layout: ``<dir>/<component>/adapter_{config.json,model.safetensors}``.

    Each sub-folder loads with ``PeftModel.from_pretrained(component, folder)`` (PEFT needs its CUDA
    extension for more than one butterfly factor). Component folders must not exist yet; an error leaves
    none half-written. Returns ``<dir>``.
    """
    adapter = get_boft_adapter(pipe, adapter_name)
    components = pipeline_components(pipe)
    plans = {
        comp: plan_adapter(components[comp], config, adapter_name) for comp, config in adapter.configs.items()
    }
    return write_peft_adapter(adapter, save_directory, plans)


def load_boft_weights(
    pipe: Any,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    adapter_name: str | None = None,
) -> str:
    """Load an adapter (folder, ``.safetensors`` file, PEFT folder or state dict) into ``pipe``.

    Everything is checked before the pipeline is touched: components, targets, shapes. On any
    error the pipeline is exactly as before. The adapter becomes active. Returns its name.
    """
    adapter = read_adapter(path_or_state_dict)
    name = adapter_name or adapter.adapter_name
    plans = _plan_fit(pipe, adapter, name)
    apply_adapter_plans(pipe, plans, adapter.tensors)
    return name


def _plan_fit(pipe: Any, adapter: AdapterFile, name: str) -> dict[str, AdapterPlan]:
    """Each component's plan for ``adapter``, checked against its tensors; raises naming file and module."""
    components = pipeline_components(pipe)
    plans = {}
    for comp, config in adapter.configs.items():
        if comp not in components:
            raise AdapterFormatError(
                f"{adapter.source}: adapter has weights for {comp!r}, the pipeline has no such component"
            )
        if name in adapter_configs(components[comp]):
            raise ValueError(f"{comp} already has an adapter named {name!r}; pass another adapter_name")
        try:
            plans[comp] = plan_adapter(components[comp], config, name)
        except (ValueError, TypeError) as err:
            raise AdapterFormatError(f"{adapter.source}: adapter does not fit {comp}: {err}") from err
        try:
            check_adapter_state_dict(plans[comp], adapter.tensors.get(comp, {}), prefix=f"{comp}.")
        except ValueError as err:
            raise AdapterFormatError(f"{adapter.source}: {err}") from err
    return plans
