"""Saving and loading adapters on a pipeline: ``save_boft_weights`` and ``load_boft_weights``.

Loading checks every component, target, shape and value (no NaN or inf) before the pipeline is
touched, so a file that does not fit leaves the pipeline exactly as it was. A trained bias of an
adapted layer (``<path>.bias``) goes into the adapter's own bias (``layer.boft_bias``), never into the
base layer's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import BOFTConfig
from ..functional import num_free_entries
from ..inject import ModulesToSave, adapter_configs, boft_layers, find_target_names
from ..layers import BOFTLayer, wrap_layer
from ..pipeline import BOFT_LOADABLE_COMPONENTS, _components, add_boft_to_pipeline
from .format import (
    AdapterFile,
    AdapterFormatError,
    check_finite,
    get_boft_adapter,
    read_adapter,
    write_adapter,
)
from .peft import is_peft_adapter, read_peft_adapter

__all__ = ["get_boft_adapter", "load_boft_weights", "save_boft_weights"]


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


# --- loading ------------------------------------------------------------------------------------
def _config_from_tensors(tensors: Mapping[str, torch.Tensor]) -> BOFTConfig:
    """Infer a config from a bare state dict: block size and factors from ``boft_R``'s shape."""
    generators = {k[: -len(".boft_R")]: t for k, t in tensors.items() if k.endswith(".boft_R")}
    if not generators:
        raise AdapterFormatError("state dict holds no '.boft_R' tensor")
    shapes = {tuple(t.shape) for t in generators.values()}
    m, _, free = next(iter(shapes))
    block = next((b for b in range(1, 4097) if num_free_entries(b) == free), None)
    if block is None or len({(s[0], s[2]) for s in shapes}) != 1:
        raise AdapterFormatError(
            f"boft_R shapes {sorted(shapes)} do not share one block size and factor count"
        )
    others = [k for k in tensors if not k.endswith((".boft_R", ".boft_s"))]
    biases = [k for k in others if k.endswith(".bias")]
    bias = (
        "none"
        if not biases
        else "boft_only"
        if all(k[: -len(".bias")] in generators for k in biases)
        else "all"
    )
    saved = sorted({k.rpartition(".")[0] for k in others if not (k.endswith(".bias") and bias != "none")})
    return BOFTConfig(
        boft_block_size=block,
        boft_n_butterfly_factor=m,
        target_modules=sorted(generators),
        bias=bias,
        modules_to_save=saved or None,
    )


def _as_adapter(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> AdapterFile:
    if not isinstance(source, Mapping):
        return read_peft_adapter(source) if is_peft_adapter(source) else read_adapter(source)
    check_finite(source, "<state dict>")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in source.items():
        comp, _, rest = key.partition(".")
        if comp not in BOFT_LOADABLE_COMPONENTS:
            raise AdapterFormatError(
                f"state dict key {key!r} does not start with a component {BOFT_LOADABLE_COMPONENTS}"
            )
        tensors.setdefault(comp, {})[rest] = tensor
    return AdapterFile(tensors, {c: _config_from_tensors(t) for c, t in tensors.items()})


def _expected_shapes(module: nn.Module, config: BOFTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor key the adapter must hold for ``module``, with its shape (nothing is modified)."""
    modules = dict(module.named_modules())
    expected = {}
    for name in find_target_names(module, config):
        target = modules[name]
        layer = target if isinstance(target, BOFTLayer) else wrap_layer(target, config)
        layout = config.resolve_blocks(layer.rotation_dim, name)
        expected[f"{name}.boft_R"] = (layout.n_factors, layout.block_num, num_free_entries(layout.block_size))
        expected[f"{name}.boft_s"] = (layer.out_features,)
        if config.bias == "boft_only" and layer.base_layer.bias is not None:
            expected[f"{name}.bias"] = tuple(layer.base_layer.bias.shape)
    return expected


def _check_fits(
    module: nn.Module, comp: str, config: BOFTConfig, tensors: Mapping[str, torch.Tensor], src: str
) -> None:
    """Raise naming the file and module unless ``tensors`` fit ``module`` exactly."""
    try:
        expected = _expected_shapes(module, config)
    except (ValueError, TypeError) as err:
        raise AdapterFormatError(f"{src}: adapter does not fit {comp}: {err}") from err
    params = {n.replace(".base_layer", ""): p for n, p in module.named_parameters()}
    layers = boft_layers(module)
    for key, tensor in tensors.items():
        shape = expected.get(key)
        if shape is None and not key.endswith((".boft_R", ".boft_s")):
            path = key.rpartition(".")[0]
            if path in layers and f"{path}.boft_R" not in expected:
                raise AdapterFormatError(
                    f"{src}: {comp}.{key} belongs to {path!r}, a layer another adapter holds and this one "
                    "does not target"
                )
            if key.endswith(".bias") and f"{path}.boft_R" in expected and config.bias == "none":
                raise AdapterFormatError(
                    f"{src}: {comp}.{key} is a trained bias, but the adapter's config has bias='none'"
                )
            param = params[key] if key in params else _saved_param(module, key)
            shape = None if param is None else tuple(param.shape)
        if shape is None:
            raise AdapterFormatError(f"{src}: {comp} has no target module for {key!r}")
        if tuple(tensor.shape) != shape:
            raise AdapterFormatError(
                f"{src}: {comp}.{key} has shape {tuple(tensor.shape)}, the model needs {shape}"
            )
    missing = sorted(k for k in expected if k not in tensors)
    if missing:
        raise AdapterFormatError(f"{src}: {comp} targets {missing[:3]} have no weights in the adapter")


def _saved_param(module: nn.Module, key: str) -> torch.Tensor | None:
    """Parameter ``key`` of a ``modules_to_save`` target (the original's, before wrapping)."""
    for name, sub in module.named_modules():
        inner = sub.original if isinstance(sub, ModulesToSave) else sub
        if name and key.startswith(name + "."):
            rest = key[len(name) + 1 :]
            found = dict(inner.named_parameters()).get(rest)
            if found is not None:
                return found
    return None


def load_boft_weights(
    pipe: Any,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    adapter_name: str | None = None,
) -> str:
    """Load an adapter (folder, ``.safetensors`` file, PEFT folder or state dict) into ``pipe``.

    Everything is checked before the pipeline is touched: components, targets, shapes. On any
    error the pipeline is exactly as before. The adapter becomes active. Returns its name.
    """
    adapter = _as_adapter(path_or_state_dict)
    name = adapter_name or adapter.adapter_name
    components = _components(pipe)
    for comp, config in adapter.configs.items():
        if comp not in components:
            raise AdapterFormatError(
                f"{adapter.source}: adapter has weights for {comp!r}, the pipeline has no such component"
            )
        if name in adapter_configs(components[comp]):
            raise ValueError(f"{comp} already has an adapter named {name!r}; pass another adapter_name")
        _check_fits(components[comp], comp, config, adapter.tensors[comp], adapter.source)
    add_boft_to_pipeline(pipe, adapter.configs, name)
    for comp, tensors in adapter.tensors.items():
        _load_tensors(components[comp], name, tensors)
    return name


@torch.no_grad()
def _load_tensors(module: nn.Module, adapter_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    layers = boft_layers(module)
    params = {n.replace(".base_layer", ""): p for n, p in module.named_parameters()}
    for key, tensor in tensors.items():
        path, _, leaf = key.rpartition(".")
        if leaf in ("boft_R", "boft_s") and path in layers:
            target = getattr(layers[path], leaf)[adapter_name]
        elif leaf == "bias" and path in layers and adapter_name in layers[path].boft_bias:
            target = layers[path].boft_bias[adapter_name]  # the adapter's own bias, not the base layer's
        else:
            target = _copy_param(module, adapter_name, key)
            target = params[key] if target is None else target
        target.copy_(tensor.to(target.dtype))


def _copy_param(module: nn.Module, adapter_name: str, key: str) -> torch.Tensor | None:
    for name, sub in module.named_modules():
        if isinstance(sub, ModulesToSave) and key.startswith(name + "."):
            return dict(sub.copies[adapter_name].named_parameters()).get(key[len(name) + 1 :])
    return None
