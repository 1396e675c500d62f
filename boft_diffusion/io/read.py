"""One entry point for reading an adapter from any source (:func:`read_adapter`), and one for telling
what any file is (:func:`detect_format`).

A source is this project's file or folder (:func:`~boft_diffusion.io.format.read_adapter_file`), a PEFT
adapter folder (:func:`~boft_diffusion.io.peft.read_peft_adapter`), a kohya network file
(:func:`~boft_diffusion.io.kohya.read_kohya_adapter`: sd-scripts' ``networks.boft`` exactly, refusing
what cannot load exactly) or an
in-memory state dict with component-prefixed keys (``unet.<path>.boft_R``, ...), whose config is
inferred from the tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import BOFTConfig
from ..functional import block_size_of
from ..pipeline import loadable_components
from ..trained_state import STATE_PREFIX
from .format import (
    ADAPTER_WEIGHTS_NAME,
    FORMAT_NAME,
    AdapterFile,
    AdapterFormatError,
    check_finite,
    read_adapter_file,
)
from .kohya import is_kohya_adapter, is_kohya_keys, kohya_network_kind, read_kohya_adapter, safetensors_header
from .peft import CONFIG_NAME, WEIGHTS_NAME, _peft_folders, is_peft_adapter, read_peft_adapter

__all__ = ["FILE_FORMATS", "DetectedFormat", "adapter_from_state_dict", "detect_format", "read_adapter"]

FILE_FORMATS = (
    "boft_diffusion",
    "peft_boft",
    "kohya_boft",
    "kohya_oft",
    "lora",
    "diff",
    "checkpoint",
    "diffusers",
)
"""What :func:`detect_format` tells apart: this project's adapter, a PEFT BOFT folder, a kohya sd-scripts
``networks.boft`` file (loads here), a kohya OFT network (``networks.oft``, ``networks.oft_v2``, LyCORIS:
refused), a LoRA (diffusers / PEFT / kohya keys), a full-difference file (``.diff`` / ``.diff_b``), a merged
single-file checkpoint (``model.diffusion_model.*``) and a diffusers pipeline folder."""

LORA_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora.down.weight",
    ".lora.up.weight",
    ".lora_down.weight",
    ".lora_up.weight",
)
DIFF_SUFFIXES = (".diff", ".diff_b")
CHECKPOINT_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.embedders.",
)


@dataclass(frozen=True)
class DetectedFormat:
    """What a file or folder is: ``kind`` (one of :data:`FILE_FORMATS`), its safetensors ``files``
    (``{component: file}``, component ``""`` where the keys name it) and a ``variant`` (who wrote it:
    ``kohya``, ``diffusers``, ``peft``, the kohya network type, ...)."""

    kind: str
    files: dict[str, Path] = field(default_factory=dict)
    variant: str = ""


def read_adapter(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> AdapterFile:
    """Read and check an adapter: this project's file or folder, a PEFT folder, or a state dict.

    Raises :class:`AdapterFormatError` naming the file (or ``FileNotFoundError`` for a missing path).
    """
    if isinstance(source, Mapping):
        return adapter_from_state_dict(source)
    if is_peft_adapter(source):
        return read_peft_adapter(source)
    return read_kohya_adapter(source) if is_kohya_adapter(source) else read_adapter_file(source)


def detect_format(path: str | os.PathLike) -> DetectedFormat:
    """Which format the file or folder at ``path`` is in, from its names, metadata and keys (tensors are
    not read). Raises ``FileNotFoundError`` or :class:`AdapterFormatError` (unreadable or unknown)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME) and _peft_folders(path):
        path = path.parent
    if path.is_file():
        return _detect_file(path)
    if (path / "model_index.json").is_file():
        return DetectedFormat("diffusers")
    if _peft_folders(path):
        return _detect_peft(path)
    candidates = [path / ADAPTER_WEIGHTS_NAME] if (path / ADAPTER_WEIGHTS_NAME).is_file() else []
    candidates = candidates or sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise AdapterFormatError(
            f"{path}: a folder with {len(candidates)} .safetensors files and no model_index.json, "
            f"{CONFIG_NAME} or {ADAPTER_WEIGHTS_NAME}; pass one file"
        )
    return _detect_file(candidates[0])


def _detect_peft(path: Path) -> DetectedFormat:
    types = {}
    for comp, folder in _peft_folders(path).items():
        try:
            raw = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise AdapterFormatError(
                f"{folder / CONFIG_NAME}: not a readable adapter config ({err})"
            ) from None
        types[comp] = raw.get("peft_type") if isinstance(raw, dict) else None
    if set(types.values()) == {"BOFT"}:
        return DetectedFormat(
            "peft_boft", {c: f / WEIGHTS_NAME for c, f in _peft_folders(path).items()}, "peft"
        )
    if set(types.values()) == {"LORA"}:
        return DetectedFormat("lora", {c: f / WEIGHTS_NAME for c, f in _peft_folders(path).items()}, "peft")
    raise AdapterFormatError(
        f"{path}: a PEFT adapter of type {sorted(map(str, types.values()))}; known: BOFT, LORA"
    )


def _detect_file(file: Path) -> DetectedFormat:
    shapes, metadata = safetensors_header(file)
    one = {"": file}
    if metadata.get("format") == FORMAT_NAME:
        return DetectedFormat("boft_diffusion", one)
    if is_kohya_keys(shapes):  # before ".boft_R" below: networks.boft names its tensors boft_R too
        kind, variant = kohya_network_kind(shapes, metadata)
        if kind == "BOFT":
            return DetectedFormat("kohya_boft", one, variant)
        if kind == "OFT":
            return DetectedFormat("kohya_oft", one, variant)
        if kind == "unknown":
            raise AdapterFormatError(f"{file}: kohya module names, but tensors of no known network type")
        return DetectedFormat("diff" if kind == "full difference" else "lora", one, f"kohya {kind}")
    if any(k.endswith(".boft_R") for k in shapes):
        return DetectedFormat("boft_diffusion", one)
    if any(k.endswith(LORA_SUFFIXES) for k in shapes):
        return DetectedFormat("lora", one, "diffusers")
    if any(k.endswith(DIFF_SUFFIXES) for k in shapes):
        return DetectedFormat("diff", one)
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in shapes):
        return DetectedFormat("checkpoint", one)
    raise AdapterFormatError(
        f"{file}: not an adapter, LoRA, difference or checkpoint file this tool knows "
        f"(keys such as {sorted(shapes)[:3]})"
    )


def adapter_from_state_dict(state: Mapping[str, torch.Tensor]) -> AdapterFile:
    """An adapter from component-prefixed tensors (``unet.<path>.boft_R``, ...), configs inferred."""
    check_finite(state, "<state dict>")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    components = loadable_components()
    for key, tensor in state.items():
        comp, _, rest = key.partition(".")
        kind, _, name = rest.partition(".")
        if comp == STATE_PREFIX and kind and name:
            states.setdefault(kind, {})[name] = tensor
            continue
        if comp not in components:
            raise AdapterFormatError(
                f"state dict key {key!r} does not start with a component {components} "
                f"(or {STATE_PREFIX}.<kind>. for trained state)"
            )
        tensors.setdefault(comp, {})[rest] = tensor
    configs = {c: _config_from_tensors(t) for c, t in tensors.items()}
    return AdapterFile(tensors, configs, states=states)


def _config_from_tensors(tensors: Mapping[str, torch.Tensor]) -> BOFTConfig:
    """Infer a config from a bare state dict: block size and factors from ``boft_R``'s shape."""
    generators = {k[: -len(".boft_R")]: t for k, t in tensors.items() if k.endswith(".boft_R")}
    if not generators:
        raise AdapterFormatError("state dict holds no '.boft_R' tensor")
    shapes = {tuple(t.shape) for t in generators.values()}
    m, _, free = next(iter(shapes))
    block = block_size_of(free)
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
