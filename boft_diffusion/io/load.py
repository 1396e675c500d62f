"""Adapters on a pipeline: ``save_boft_weights``, ``load_boft_weights`` and ``save_peft_adapter``.

Loading plans the adapter on every component (:func:`~boft_diffusion.inject.plan_adapter`) and checks
every target, shape and value (no NaN or inf) against the plan before the pipeline is touched, so a
file that does not fit leaves the pipeline exactly as it was. The tensors then go in through
:func:`~boft_diffusion.inject.load_adapter_state_dict`, the inverse of what saving took out; a trained
bias of an adapted layer goes into the adapter's own bias, never into the base layer's.

Trained state besides BOFT's goes through one door (:mod:`boft_diffusion.trained_state`): saving asks
every registered kind what to add, loading has every kind the file carries check and build its state
before anything is attached, and attaches them all or none. This module names no kind (the light control
encoder and the ControlNet are :mod:`boft_diffusion.control.state`'s).

A file describes; it never chooses. Loading opens the path it is given and nothing else: a folder or hub
id an adapter records (the ControlNet it was trained on) is named in messages, never opened, and a
``state.<kind>`` no registered kind reads is refused. A module built from what the metadata says is
built only once every size the metadata claims is that of the file's own tensors (checked on the meta
device), so an absurd claim is one :class:`~boft_diffusion.io.format.AdapterFormatError` and costs no
memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..families import UnsupportedFamilyError, family_of, get_family
from ..inject import AdapterPlan, adapter_configs, adapter_state_dict, check_adapter_state_dict, plan_adapter
from ..pipeline import apply_adapter_plans, pipeline_components
from ..trained_state import Attachment, trained_states
from .format import AdapterFile, AdapterFormatError, write_adapter
from .peft import write_peft_adapter
from .read import read_adapter

__all__ = [
    "get_boft_adapter",
    "load_boft_weights",
    "save_boft_weights",
    "save_peft_adapter",
]


def get_boft_adapter(pipe: Any, adapter_name: str = "default") -> AdapterFile:
    """The trained tensors and configs of one adapter across the pipeline's components, with what every
    registered kind of trained state (:mod:`boft_diffusion.trained_state`) saves of it."""
    tensors, configs = {}, {}
    for comp, module in pipeline_components(pipe).items():
        if adapter_name in adapter_configs(module):
            tensors[comp] = adapter_state_dict(module, adapter_name)
            configs[comp] = adapter_configs(module)[adapter_name]
    if not configs:
        raise ValueError(f"No component of the pipeline holds a BOFT adapter named {adapter_name!r}")
    adapter = AdapterFile(tensors, configs, adapter_name)
    for kind in trained_states():
        saved = kind.collect(pipe, adapter_name, configs)
        if saved is not None:
            adapter.metadata |= saved.metadata
            if saved.tensors:
                adapter.states[kind.name] = dict(saved.tensors)
    return adapter


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
    *,
    controlnet: torch.nn.Module | None = None,
) -> str:
    """Load an adapter (folder, ``.safetensors`` file, PEFT folder or state dict) into ``pipe``.

    Everything is checked before the pipeline is touched: components, targets, shapes, and every size
    the file's metadata claims. On any error the pipeline is exactly as before. The adapter becomes
    active. Returns its name.

    Where it looks: at ``path_or_state_dict`` only (a file; in a folder, ``boft_weights.safetensors``
    or a PEFT layout), never at a path or hub id the file records.

    - An adapter trained with a light control encoder (:mod:`boft_diffusion.control`) brings it: a
      pipeline without one gets it built from the file's metadata, once the widths it claims are those of
      the file's encoder tensors, and attached to its UNet.
    - An adapter with ControlNet weights loads onto ``controlnet`` (which becomes ``pipe.controlnet``;
      give it only to a pipeline without another one) or onto ``pipe.controlnet``. The ControlNet's
      fingerprint (:func:`~boft_diffusion.control.controlnet_fingerprints`) must be the one the file
      records, else :class:`AdapterFormatError` naming both; a file that records none (written before
      fingerprints were) loads with a warning. Given no ControlNet, an adapter trained on one made
      ``from_unet`` gets it rebuilt from ``pipe.unet`` (its condition embedding's claimed widths checked
      against the file first; no path opened); any other is refused, the ControlNet it records named.
      ``controlnet`` is ignored for an adapter without ControlNet weights.
    """
    adapter = read_adapter(path_or_state_dict)
    name = adapter_name or adapter.adapter_name
    _check_family(pipe, adapter)
    attachments = prepare_trained_state(pipe, adapter, name, {"controlnet": controlnet})
    extra = {comp: module for a in attachments for comp, module in a.components.items()}
    plans = _plan_fit(pipe, adapter, name, extra)
    for attachment in attachments:
        attachment.check(plans)
    attached: list[Attachment] = []
    try:
        for attachment in attachments:
            attachment.attach()
            attached.append(attachment)
        apply_adapter_plans(pipe, plans, adapter.tensors)
    except BaseException:
        for attachment in reversed(attached):
            attachment.detach()
        raise
    return name


def prepare_trained_state(
    pipe: Any, adapter: AdapterFile, adapter_name: str, options: Mapping[str, Any]
) -> list[Attachment]:
    """Every registered kind's state in ``adapter`` (loading as ``adapter_name``), checked against ``pipe`` and
    built, nothing attached.

    A ``state.<kind>`` no registered kind reads is an :class:`AdapterFormatError`: a file never chooses code.
    """
    kinds = {kind.name: kind for kind in trained_states()}
    unknown = sorted(set(adapter.states) - set(kinds))
    if unknown:
        raise AdapterFormatError(
            f"{adapter.source}: holds trained state {', '.join(map(repr, unknown))} that this version does not "
            f"read (it reads {', '.join(kinds) or 'none'})"
        )
    prepared = (
        kind.prepare(pipe, adapter, adapter_name, options)
        for kind in kinds.values()
        if kind.carried_by(adapter)
    )
    return [attachment for attachment in prepared if attachment is not None]


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
