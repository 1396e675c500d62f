"""Adapters on a pipeline: ``save_boft_weights``, ``load_boft_weights`` and ``save_peft_adapter``.

Loading plans the adapter on every component (:func:`~boft_diffusion.inject.plan_adapter`) and checks
every target, shape and value (no NaN or inf) against the plan before the pipeline is touched, so a
file that does not fit leaves the pipeline exactly as it was. The tensors then go in through
:func:`~boft_diffusion.inject.load_adapter_state_dict`, the inverse of what saving took out; a trained
bias of an adapted layer goes into the adapter's own bias, never into the base layer's.

A file describes; it never chooses. Loading opens the path it is given and nothing else: a folder or hub
id an adapter records (the ControlNet it was trained on) is named in messages, never opened; the caller
gives that ControlNet, and its fingerprint must be the one recorded. A module built from what the
metadata says (a light control encoder, a ControlNet rebuilt from the pipeline's UNet) is built only once
every size the metadata claims is that of the file's own tensors (checked on the meta device), so an
absurd claim is one :class:`~boft_diffusion.io.format.AdapterFormatError` and costs no memory.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..control import (
    CONTROL_COMPONENT,
    CONTROL_METADATA,
    CONTROLNET_FINGERPRINTS,
    LIGHT_CONTROL_METADATA,
    LightControl,
    LightControlConfig,
    claim_problem,
    condition_embedding_shapes,
    controlnet_fingerprints,
    controlnet_from_unet,
    light_control,
    remove_light_control,
)
from ..families import UnsupportedFamilyError, family_of, get_family
from ..inject import AdapterPlan, adapter_configs, adapter_state_dict, check_adapter_state_dict, plan_adapter
from ..pipeline import apply_adapter_plans, pipeline_components
from .format import AdapterFile, AdapterFormatError, write_adapter
from .peft import write_peft_adapter
from .read import read_adapter

__all__ = [
    "check_control_claims",
    "control_metadata",
    "get_boft_adapter",
    "load_boft_weights",
    "save_boft_weights",
    "save_peft_adapter",
]


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
    control = _new_light_control(pipe, adapter)
    net, how = _controlnet(pipe, adapter, controlnet)
    extra = {CONTROL_COMPONENT: control} if control is not None else {}
    extra |= {"controlnet": net} if how != "pipeline" else {}
    plans = _plan_fit(pipe, adapter, name, extra)
    if net is not None:
        _check_controlnet_fingerprint(adapter, net, plans["controlnet"], how)
    if control is not None:
        control.attach(pipe.unet)
        setattr(pipe, CONTROL_COMPONENT, control)
    if "controlnet" in extra:
        pipe.controlnet = net
    try:
        apply_adapter_plans(pipe, plans, adapter.tensors)
    except BaseException:
        if control is not None:
            remove_light_control(pipe)
        if "controlnet" in extra:
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


# --- what the metadata says about the control, checked against the file ---------------------------------
def control_metadata(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    """What an adapter's ``metadata`` records about its control (``None``: nothing), parsed and checked for
    type; nothing is built or opened. Light: ``{"mode": "light", ..., "encoder": LightControlConfig}``.
    ControlNet: the JSON object of :data:`~boft_diffusion.control.CONTROL_METADATA`, with ``"controlnet"`` a
    string (``"from_unet"`` or where the training run loaded it: a hint), ``"seed"`` an integer in
    ``[0, 2**63)``, any ``"conditioning_embedding_out_channels"`` positive integers, any
    ``"conditioning_scale"`` a finite number and any fingerprints strings. Raises
    :class:`AdapterFormatError` naming ``source``."""
    if CONTROL_METADATA not in metadata and LIGHT_CONTROL_METADATA not in metadata:
        return None
    try:
        info = json.loads(metadata.get(CONTROL_METADATA, '{"mode": "light"}'))
        if not isinstance(info, dict) or info.get("mode") not in ("light", "controlnet"):
            raise ValueError(f"{CONTROL_METADATA!r} must be an object with mode light or controlnet")
        return _light_record(info, metadata) if info["mode"] == "light" else _controlnet_record(info)
    except (ValueError, TypeError, RecursionError) as err:
        message = " ".join(str(err).split())[:300]
        raise AdapterFormatError(f"{source}: invalid control metadata ({message})") from None


def _light_record(info: dict[str, Any], metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(LIGHT_CONTROL_METADATA)
    if raw is None:
        raise ValueError(f"no {LIGHT_CONTROL_METADATA!r} metadata describes its encoder")
    return {**info, "encoder": LightControlConfig.from_dict(json.loads(raw))}


def _controlnet_record(info: dict[str, Any]) -> dict[str, Any]:
    info = {"controlnet": "from_unet", "seed": 0, **info}
    widths = info.get("conditioning_embedding_out_channels")
    seed = info["seed"]
    if not isinstance(info["controlnet"], str):
        raise ValueError(f"its controlnet must be a string, got {type(info['controlnet']).__name__}")
    if widths is not None and not (isinstance(widths, list) and widths and all(_positive(w) for w in widths)):
        raise ValueError(
            f"conditioning_embedding_out_channels must be a list of positive integers, got {widths!r}"
        )
    if not (_positive(seed) or seed == 0) or seed >= 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    scale = info.get("conditioning_scale", 1.0)
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"conditioning_scale must be a finite number, got {scale!r}")
    if not all(isinstance(info.get(key, ""), str) for key in CONTROLNET_FINGERPRINTS):
        raise ValueError(f"{' and '.join(CONTROLNET_FINGERPRINTS)} must be strings")
    return info


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _shapes(adapter: AdapterFile, comp: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{key after prefix: shape}`` of the file's ``comp`` tensors under ``prefix``."""
    tensors = adapter.tensors.get(comp, {})
    return {k[len(prefix) :]: tuple(t.shape) for k, t in tensors.items() if k.startswith(prefix)}


def check_control_claims(
    adapter: AdapterFile, info: Mapping[str, Any] | None, embedding_channels: int | None = None
) -> None:
    """Every size the control metadata ``info`` (:func:`control_metadata`) claims must be that of the file's
    own tensors; checked on the meta device (:func:`~boft_diffusion.control.claim_problem`), nothing built.

    The light encoder against the file's ``control_encoder`` tensors; the condition embedding of a
    ``from_unet`` ControlNet against its ``controlnet_cond_embedding`` tensors, for a UNet whose first width
    is ``embedding_channels`` (default: the file's). Components the file does not hold are not checked.
    Raises :class:`AdapterFormatError` naming the file, the claimed shape and the file's.
    """
    mode = info["mode"] if info else None
    problem = None
    if mode == "light" and CONTROL_COMPONENT in adapter.configs:
        problem = _light_claim(adapter, info["encoder"])
    elif mode == "controlnet" and info["controlnet"] == "from_unet" and "controlnet" in adapter.configs:
        problem = _embedding_claim(
            adapter, info.get("conditioning_embedding_out_channels"), embedding_channels
        )
    if problem:
        raise AdapterFormatError(f"{adapter.source}: {problem}")


def _light_claim(adapter: AdapterFile, config: LightControlConfig) -> str | None:
    return claim_problem(
        f"its {LIGHT_CONTROL_METADATA} metadata claims an encoder",
        config.block_out_channels,
        lambda: {f"encoder.{key}": shape for key, shape in config.shapes().items()},
        _shapes(adapter, CONTROL_COMPONENT),
    )


def _embedding_claim(
    adapter: AdapterFile, widths: list[int] | None, embedding_channels: int | None
) -> str | None:
    if widths is None:
        return None  # nothing claimed (and nothing to rebuild from)
    found = _shapes(adapter, "controlnet", "controlnet_cond_embedding.")
    out = embedding_channels or found.get("conv_out.weight", (1,))[0]
    return claim_problem(
        f"its {CONTROL_METADATA} metadata claims a ControlNet condition embedding",
        widths,
        lambda: condition_embedding_shapes(out, 3, widths),
        found,
    )


# --- the control modules an adapter loads onto ------------------------------------------------------------
def _new_light_control(pipe: Any, adapter: AdapterFile) -> LightControl | None:
    """The light control encoder ``adapter`` needs and ``pipe`` lacks (not attached yet), else ``None``:
    built from the file's metadata once its claimed sizes are checked against the file's tensors."""
    if CONTROL_COMPONENT not in adapter.configs or light_control(pipe) is not None:
        return None
    info = control_metadata(adapter.metadata, adapter.source)
    if info is None or info["mode"] != "light":
        raise AdapterFormatError(
            f"{adapter.source}: invalid control metadata (no {LIGHT_CONTROL_METADATA!r} metadata describes "
            "its encoder)"
        )
    config: LightControlConfig = info["encoder"]
    unet = getattr(pipe, "unet", None)
    width = getattr(getattr(unet, "conv_in", None), "out_channels", None)
    if width != config.embedding_channels:
        raise AdapterFormatError(
            f"{adapter.source}: its light control encoder feeds {config.embedding_channels} channels, the "
            f"pipeline's UNet conv_in has {width}: the adapter was trained for another model"
        )
    check_control_claims(adapter, info)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the untrained original (zero output); the trained copy comes from the file
        control = LightControl(config)
    return control.to(device=unet.conv_in.weight.device).eval()


def _controlnet(pipe: Any, adapter: AdapterFile, given: torch.nn.Module | None) -> tuple[Any, str]:
    """The ControlNet ``adapter`` loads onto and where it comes from: ``"given"`` (``controlnet=``, not on
    ``pipe`` yet), ``"pipeline"`` (``pipe.controlnet``) or ``"rebuilt"`` (from ``pipe.unet``, for a
    ``from_unet`` adapter, its claimed widths checked first). ``(None, "pipeline")`` for an adapter
    without ControlNet weights. Nothing the file records is opened."""
    if "controlnet" not in adapter.configs:
        return None, "pipeline"
    current = pipeline_components(pipe).get("controlnet")
    if given is not None and current is not None and given is not current:
        raise ValueError(
            "the pipeline already has a ControlNet (pipe.controlnet) and another was passed as controlnet=; "
            "pass it to a pipeline without one"
        )
    if current is not None:
        return current, "pipeline"
    if given is not None:
        return given, "given"
    info = control_metadata(adapter.metadata, adapter.source) or {"mode": None}
    if info["mode"] != "controlnet" or info["controlnet"] != "from_unet":
        raise AdapterFormatError(f"{adapter.source}: {_name_the_controlnet(info)}")
    return _rebuilt_controlnet(pipe, adapter, info), "rebuilt"


_GIVE_THE_CONTROLNET = (
    "load it yourself and pass it: load_boft_weights(pipe, path, controlnet=ControlNetModel.from_pretrained(...)), "
    "or set pipe.controlnet; or `boft-diffusion sample --controlnet PATH`"
)


def _name_the_controlnet(info: Mapping[str, Any]) -> str:
    """The message for an adapter whose ControlNet the caller did not give: what the file records, as a hint."""
    if info.get("mode") != "controlnet":
        return f"the adapter holds ControlNet weights and records no ControlNet; {_GIVE_THE_CONTROLNET}"
    source = info["controlnet"]
    hint = repr(source) if len(source) <= 200 else repr(source[:197] + "...")
    fingerprint = info.get(CONTROLNET_FINGERPRINTS[0]) or "not recorded"
    return (
        f"the adapter was trained on the ControlNet {hint} (fingerprint {fingerprint}); an adapter file never "
        f"chooses what is loaded, so that is not opened: {_GIVE_THE_CONTROLNET}"
    )


def _rebuilt_controlnet(pipe: Any, adapter: AdapterFile, info: Mapping[str, Any]) -> torch.nn.Module:
    """A ``from_unet`` adapter's ControlNet, rebuilt from the pipeline's UNet once the file's tensors have
    the widths its metadata claims."""
    unet = pipeline_components(pipe).get("unet")
    widths = info.get("conditioning_embedding_out_channels")
    if unet is None or widths is None:
        missing = "the pipeline has no UNet" if unet is None else "no conditioning_embedding_out_channels"
        raise AdapterFormatError(
            f"{adapter.source}: cannot rebuild its from_unet ControlNet ({missing}); {_GIVE_THE_CONTROLNET}"
        )
    check_control_claims(adapter, info, embedding_channels=unet.config.block_out_channels[0])
    return controlnet_from_unet(unet, widths, info["seed"])


def _check_controlnet_fingerprint(adapter: AdapterFile, controlnet: Any, plan: AdapterPlan, how: str) -> None:
    """The fingerprint ``adapter`` records must be ``controlnet``'s (modules the adapter trains in full left
    out); a file recording none passes, with a warning unless the ControlNet was rebuilt as it records."""
    info = control_metadata(adapter.metadata, adapter.source) or {}
    recorded = [info[key] for key in CONTROLNET_FINGERPRINTS if info.get(key)]
    if not recorded:
        if how != "rebuilt":
            warnings.warn(
                f"{adapter.source} records no ControlNet fingerprint (written before they were recorded): "
                "cannot check that the ControlNet it loads onto is the one it was trained on",
                stacklevel=3,
            )
        return
    ours = controlnet_fingerprints(controlnet, plan.saved)
    if set(recorded).isdisjoint(ours.values()):
        which = {
            "rebuilt": "the ControlNet rebuilt from this pipeline's UNet",
            "given": "the ControlNet given",
        }
        raise AdapterFormatError(
            f"{adapter.source}: the adapter was trained on a ControlNet with fingerprint {recorded[0]}; "
            f"{which.get(how, 'pipe.controlnet')} has fingerprint {ours[CONTROLNET_FINGERPRINTS[0]]}: give the "
            "ControlNet it was trained on"
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
