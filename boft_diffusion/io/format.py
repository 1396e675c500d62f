"""The adapter file format: one self-describing ``boft_weights.safetensors``.

Keys are component-prefixed module paths (``unet.<path>.boft_R``, ``unet.<path>.boft_s``,
``text_encoder.<path>...``, plus ``<path>.bias`` and ``modules_to_save`` weights when trained).
Only trained tensors are stored, never permutations. Trained state besides BOFT's
(:mod:`boft_diffusion.trained_state`: token embeddings, ...) is stored as ``state.<kind>.<key>``. The
metadata holds the format name and version, the adapter name, one ``BOFTConfig`` per component (JSON)
and whatever keys the registered kinds of trained state write. Writes are atomic
(:mod:`boft_diffusion.atomic`); reading never executes code, and refuses an adapter holding a
non-finite (NaN or infinite) tensor or a ``boft_config`` that is not a JSON object of configs
(malformed, wrongly typed or nested too deeply to parse). An :class:`AdapterFile` is what every
reader here returns and every writer writes; this module knows files only, never a pipeline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_file
from ..config import BOFTConfig
from ..trained_state import STATE_PREFIX

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AdapterFile",
    "AdapterFormatError",
    "atomic_save_safetensors",
    "check_finite",
    "read_adapter_file",
    "write_adapter",
]

ADAPTER_WEIGHTS_NAME = "boft_weights.safetensors"
FORMAT_NAME = "boft_diffusion"
FORMAT_VERSION = "1"


class AdapterFormatError(ValueError):
    """A file or folder that is not a usable BOFT adapter (the message names the file)."""


@dataclass
class AdapterFile:
    """An adapter in memory: tensors by component, one config per component, free-form metadata, and the
    tensors of trained state besides BOFT's by kind (:mod:`boft_diffusion.trained_state`)."""

    tensors: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, BOFTConfig]
    adapter_name: str = "default"
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<state dict>"
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`AdapterFormatError` naming ``source`` and the first tensor holding NaN or inf."""
    for key, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise AdapterFormatError(
                f"{source}: tensor {key!r} holds non-finite values (NaN or inf); the adapter is broken"
            )


def _cut(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (metadata comes from the file and may be huge)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_configs(text: str | None, file: Path) -> dict[str, BOFTConfig]:
    """The ``boft_config`` metadata: a JSON object ``{component: {BOFTConfig fields}}``."""
    try:
        if text is None:
            raise ValueError("no boft_config entry")
        raw = json.loads(text)
        if not isinstance(raw, dict) or not all(isinstance(cfg, dict) for cfg in raw.values()):
            raise ValueError("expected a JSON object of one config object per component")
        return {comp: BOFTConfig.from_dict(cfg) for comp, cfg in raw.items()}
    except RecursionError:
        raise AdapterFormatError(f"{file}: invalid boft_config metadata (JSON nested too deeply)") from None
    except (ValueError, TypeError) as err:
        message = _cut(" ".join(str(err).split()), 200)
        raise AdapterFormatError(f"{file}: invalid boft_config metadata ({message})") from err


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """``safetensors.torch.save_file`` of ``tensors`` (detached, contiguous, on the CPU), written atomically."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def write_adapter(adapter: AdapterFile, save_directory: str | os.PathLike) -> Path:
    """Write ``adapter`` as ``<save_directory>/boft_weights.safetensors``; returns the file path."""
    flat = {f"{comp}.{key}": t for comp, tensors in adapter.tensors.items() for key, t in tensors.items()}
    flat |= {
        f"{STATE_PREFIX}.{kind}.{key}": t
        for kind, tensors in adapter.states.items()
        for key, t in tensors.items()
    }
    metadata = {
        **adapter.metadata,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter.adapter_name,
        "boft_config": json.dumps({c: cfg.to_dict() for c, cfg in adapter.configs.items()}, sort_keys=True),
    }
    path = Path(save_directory) / ADAPTER_WEIGHTS_NAME
    atomic_save_safetensors(flat, path, metadata)
    return path


def _resolve_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / ADAPTER_WEIGHTS_NAME
        if not candidate.is_file():
            found = sorted(p.name for p in path.iterdir())
            raise AdapterFormatError(
                f"{path}: no {ADAPTER_WEIGHTS_NAME} in this folder (it holds {found[:10]})"
            )
        return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter file or folder")
    return path


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter file or folder of this format; raises :class:`AdapterFormatError` naming
    the file. (:func:`~boft_diffusion.io.read_adapter` reads any adapter source.)"""
    file = _resolve_file(path)
    try:
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {}
            flat = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{file}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFormatError(
            f"{file}: not a boft_diffusion adapter (metadata format={_cut(repr(metadata.get('format')))})"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(
            f"{file}: adapter format version {_cut(repr(metadata.get('format_version')))}; "
            f"this version reads {FORMAT_VERSION!r}"
        )
    configs = _parse_configs(metadata.get("boft_config"), file)
    check_finite(flat, str(file))
    tensors: dict[str, dict[str, torch.Tensor]] = {comp: {} for comp in configs}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        comp, _, rest = key.partition(".")
        if comp == STATE_PREFIX and comp not in tensors:
            kind, _, name = rest.partition(".")
            if not kind or not name:
                raise AdapterFormatError(f"{file}: tensor {key!r} is not {STATE_PREFIX}.<kind>.<key>")
            states.setdefault(kind, {})[name] = tensor
            continue
        if comp not in tensors:
            raise AdapterFormatError(
                f"{file}: tensor {key!r} belongs to component {comp!r}, which has no config"
            )
        tensors[comp][rest] = tensor
    return AdapterFile(tensors, configs, metadata.get("adapter_name", "default"), metadata, str(file), states)
