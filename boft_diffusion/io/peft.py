"""PEFT interop: read PEFT BOFT adapters, write adapters PEFT's ``PeftModel.from_pretrained`` loads.

PEFT layout: a folder with ``adapter_config.json`` (``peft_type: BOFT``) and
``adapter_model.safetensors`` for one model, or ``unet/`` and ``text_encoder/`` sub-folders as
PEFT's DreamBooth example writes. PEFT stores each generator as a full ``b × b`` matrix ``A``
(``Q = (A - A^T)/2``) and ``boft_s`` as ``(out, 1)`` (Linear) or ``(1, out)`` (Conv2d); here
generators are packed (:func:`~boft_diffusion.functional.pack_skew`, exact) and ``boft_s`` is ``(out,)``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..config import BOFTConfig
from ..functional import pack_skew, unpack_skew
from ..layers import BOFTConv2d
from .format import AdapterFile, AdapterFormatError, atomic_save_safetensors

__all__ = ["is_peft_adapter", "read_peft_adapter", "save_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_COMPONENT_DIRS = ("unet", "text_encoder", "text_encoder_2", "controlnet")


def _peft_folders(path: Path) -> dict[str, Path]:
    """``{component: folder}`` of a PEFT adapter at ``path`` (empty if it is not one)."""
    if (path / CONFIG_NAME).is_file():
        return {_component_of(path / CONFIG_NAME): path}
    return {c: path / c for c in _COMPONENT_DIRS if (path / c / CONFIG_NAME).is_file()}


def _component_of(config_file: Path) -> str:
    """Which pipeline component a single-model PEFT adapter belongs to (its base model class)."""
    raw = json.loads(config_file.read_text())
    base_class = (raw.get("auto_mapping") or {}).get("base_model_class", "")
    return "text_encoder" if "CLIPText" in base_class else "unet"


def is_peft_adapter(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and bool(_peft_folders(path))


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_NAME
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{file}: not a readable adapter config ({err})") from err
    if raw.get("peft_type") != "BOFT":
        raise AdapterFormatError(
            f"{file}: a PEFT {raw.get('peft_type')} adapter, not BOFT; only BOFT adapters load here"
        )
    if raw.get("exclude_modules") and not isinstance(raw.get("target_modules"), list | str):
        raise AdapterFormatError(f"{file}: exclude_modules without target_modules cannot be represented")
    return raw


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise AdapterFormatError(
            f"{folder}: no {WEIGHTS_NAME} (only safetensors PEFT adapters load; no pickle)"
        )
    try:
        with safe_open(file, framework="pt") as handle:
            return {k.removeprefix(_PREFIX): handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise AdapterFormatError(f"{file}: not a readable safetensors file ({err})") from err


def _convert_from_peft(
    raw: dict[str, Any], tensors: dict[str, torch.Tensor], src: Path
) -> tuple[BOFTConfig, dict]:
    """PEFT tensors -> this project's keys and shapes; the config targets exactly the adapted modules."""
    generators = {k.removesuffix(".boft_R"): t for k, t in tensors.items() if k.endswith(".boft_R")}
    if not generators:
        raise AdapterFormatError(f"{src}: no boft_R tensors")
    factors = {t.shape[0] for t in generators.values()}
    blocks = {t.shape[-1] for t in generators.values()}
    if len(factors) != 1 or len(blocks) != 1:
        raise AdapterFormatError(
            f"{src}: mixed butterfly factors {factors} or block sizes {blocks} per layer"
        )
    m, b = factors.pop(), blocks.pop()
    if m != raw.get("boft_n_butterfly_factor", 1):
        # PEFT without its CUDA extension silently trains with one factor; the tensors say what ran.
        warnings.warn(
            f"{src}: config says boft_n_butterfly_factor={raw.get('boft_n_butterfly_factor')}, "
            f"the weights hold {m} factor(s); loading what the weights hold",
            stacklevel=3,
        )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith(".boft_R"):
            out[key] = pack_skew(tensor.float())
        elif key.endswith(".boft_s"):
            out[key] = tensor.float().flatten()
        else:
            out[key.replace(".base_layer.", ".")] = tensor
    config = BOFTConfig(
        boft_block_size=b,
        boft_n_butterfly_factor=m,
        target_modules=sorted(generators),
        boft_dropout=raw.get("boft_dropout", 0.0),
        bias=raw.get("bias", "none"),
        modules_to_save=raw.get("modules_to_save"),
    )
    return config, out


def read_peft_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read a PEFT BOFT adapter folder (one model, or the DreamBooth ``unet/`` + ``text_encoder/`` layout)."""
    path = Path(path)
    folders = _peft_folders(path)
    if not folders:
        raise AdapterFormatError(f"{path}: no {CONFIG_NAME} here or in {_COMPONENT_DIRS} sub-folders")
    tensors, configs = {}, {}
    for comp, folder in folders.items():
        configs[comp], tensors[comp] = _convert_from_peft(_read_config(folder), _read_tensors(folder), folder)
    return AdapterFile(tensors, configs, "default", {"imported_from": "peft"}, str(path))


def save_peft_adapter(pipe: Any, save_directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` in PEFT's layout: ``<dir>/<component>/adapter_{config.json,model.safetensors}``.

    Each sub-folder loads with ``PeftModel.from_pretrained(component, folder)``.
    """
    from ..inject import boft_layers
    from ..pipeline import _components
    from .load import get_boft_adapter

    adapter = get_boft_adapter(pipe, adapter_name)
    components = _components(pipe)
    root = Path(save_directory)
    for comp, config in adapter.configs.items():
        layers = boft_layers(components[comp])
        tensors = {}
        for key, tensor in adapter.tensors[comp].items():
            path, _, leaf = key.rpartition(".")
            if leaf == "boft_R":
                tensors[_PREFIX + key] = unpack_skew(
                    tensor.float(), layers[path].layouts[adapter_name].block_size
                )
            elif leaf == "boft_s":
                conv = isinstance(layers[path], BOFTConv2d)
                tensors[_PREFIX + key] = tensor.reshape(1, -1) if conv else tensor.reshape(-1, 1)
            elif path in layers:  # a trained bias of an adapted layer
                tensors[f"{_PREFIX}{path}.base_layer.{leaf}"] = tensor
            else:
                tensors[_PREFIX + key] = tensor
        peft_config = {
            **config.to_dict(),
            "target_modules": sorted(
                k.removesuffix(".boft_R") for k in adapter.tensors[comp] if k.endswith(".boft_R")
            ),
            "layers_to_transform": None,
            "layers_pattern": None,
            "peft_type": "BOFT",
            "task_type": None,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            "auto_mapping": {
                "base_model_class": type(components[comp]).__name__,
                "parent_library": type(components[comp]).__module__,
            },
        }
        folder = root / comp
        atomic_save_safetensors(tensors, folder / WEIGHTS_NAME, {"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return root
