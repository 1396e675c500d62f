"""Adapters on a pipeline: ``save_boft_weights``, ``load_boft_weights`` and ``save_peft_adapter``.

Loading plans the adapter on every component (:func:`~boft_diffusion.inject.plan_adapter`) and checks
every target, shape and value (no NaN or inf) against the plan before the pipeline is touched, so a
file that does not fit leaves the pipeline exactly as it was. The tensors then go in through
:func:`~boft_diffusion.inject.load_adapter_state_dict`, the inverse of what saving took out; a trained
bias of an adapted layer goes into the adapter's own bias, never into the base layer's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..control import (
    CONTROL_COMPONENT,
    CONTROL_METADATA,
    LIGHT_CONTROL_METADATA,
    LightControl,
    LightControlConfig,
    controlnet_for,
    light_control,
    remove_light_control,
)
from ..families import UnsupportedFamilyError, family_of, get_family
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
    metadata = {}
    control = pipeline_components(pipe).get(CONTROL_COMPONENT)
    if isinstance(control, LightControl) and CONTROL_COMPONENT in configs:
        metadata[LIGHT_CONTROL_METADATA] = json.dumps(control.config.to_dict(), sort_keys=True)
    return AdapterFile(tensors, configs, adapter_name, metadata)


def save_boft_weights(
    pipe: Any,
    save_directory: str | os.PathLike,
    adapter_name: str = "default",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save one adapter as ``<save_directory>/boft_weights.safetensors`` (atomic). Returns the file."""
    adapter = get_boft_adapter(pipe, adapter_name)
    adapter.metadata = {**(metadata or {}), **adapter.metadata}
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

    An adapter trained with a light control encoder (:mod:`boft_diffusion.control`) brings it: a
    pipeline without one gets it attached to its UNet, rebuilt from the file's metadata.
    """
    adapter = read_adapter(path_or_state_dict)
    name = adapter_name or adapter.adapter_name
    _check_family(pipe, adapter)
    control = _new_light_control(pipe, adapter)
    controlnet = _new_controlnet(pipe, adapter)
    extra = {CONTROL_COMPONENT: control} if control is not None else {}
    extra |= {"controlnet": controlnet} if controlnet is not None else {}
    plans = _plan_fit(pipe, adapter, name, extra)
    if control is not None:
        control.attach(pipe.unet)
        setattr(pipe, CONTROL_COMPONENT, control)
    if controlnet is not None:
        pipe.controlnet = controlnet
    try:
        apply_adapter_plans(pipe, plans, adapter.tensors)
    except BaseException:
        if control is not None:
            remove_light_control(pipe)
        if controlnet is not None:
            delattr(pipe, "controlnet")
        raise
    return name


FAMILY_METADATA = "family"
"""Adapter metadata key: the model family (:mod:`boft_diffusion.families`) the adapter was trained on."""


def _check_family(pipe: Any, adapter: AdapterFile) -> None:
    """An adapter that records its family loads only into a pipeline of that family (files without the key,
    older or from PEFT, are checked by their components and shapes alone)."""
    recorded = adapter.metadata.get(FAMILY_METADATA)
    if not recorded:
        return
    try:
        trained_on = get_family(recorded)
    except UnsupportedFamilyError as err:
        raise AdapterFormatError(f"{adapter.source}: {err}") from None
    try:
        pipe_family = family_of(pipe)
    except UnsupportedFamilyError:
        return  # a bare {component: module} mapping: its components and shapes are checked below
    if trained_on is not pipe_family:
        raise AdapterFormatError(
            f"{adapter.source}: the adapter was trained on a {trained_on.title} ({trained_on.name}) pipeline; "
            f"this pipeline ({type(pipe).__name__}) is {pipe_family.title} ({pipe_family.name})"
        )


def _new_controlnet(pipe: Any, adapter: AdapterFile) -> torch.nn.Module | None:
    """The ControlNet ``adapter`` was trained on, rebuilt from its metadata, when ``pipe`` has none."""
    if "controlnet" not in adapter.configs or getattr(pipe, "controlnet", None) is not None:
        return None
    try:
        info = json.loads(adapter.metadata.get(CONTROL_METADATA, "null"))
        if not isinstance(info, dict) or info.get("mode") != "controlnet":
            raise ValueError(f"no {CONTROL_METADATA!r} metadata says how its ControlNet was made")
        return controlnet_for(pipe.unet, info)
    except (ValueError, TypeError, RecursionError, OSError) as err:
        raise AdapterFormatError(
            f"{adapter.source}: the adapter holds ControlNet weights and the pipeline has no ControlNet; "
            f"could not rebuild it ({err}). Pass a pipeline with its ControlNet (pipe.controlnet)"
        ) from None


def _new_light_control(pipe: Any, adapter: AdapterFile) -> LightControl | None:
    """The light control encoder ``adapter`` needs and ``pipe`` lacks (not attached yet), else ``None``."""
    if CONTROL_COMPONENT not in adapter.configs or light_control(pipe) is not None:
        return None
    raw = adapter.metadata.get(LIGHT_CONTROL_METADATA)
    try:
        if raw is None:
            raise ValueError(f"no {LIGHT_CONTROL_METADATA!r} metadata describes its encoder")
        config = LightControlConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError, RecursionError) as err:
        raise AdapterFormatError(f"{adapter.source}: invalid light control encoder ({err})") from None
    unet = getattr(pipe, "unet", None)
    width = getattr(getattr(unet, "conv_in", None), "out_channels", None)
    if width != config.embedding_channels:
        raise AdapterFormatError(
            f"{adapter.source}: its light control encoder feeds {config.embedding_channels} channels, the "
            f"pipeline's UNet conv_in has {width}: the adapter was trained for another model"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the untrained original (zero output); the trained copy comes from the file
        control = LightControl(config)
    return control.to(device=unet.conv_in.weight.device).eval()


def _plan_fit(
    pipe: Any, adapter: AdapterFile, name: str, extra: Mapping[str, torch.nn.Module] | None = None
) -> dict[str, AdapterPlan]:
    """Each component's plan for ``adapter``, checked against its tensors; raises naming file and module."""
    components = {**pipeline_components(pipe), **(extra or {})}
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
