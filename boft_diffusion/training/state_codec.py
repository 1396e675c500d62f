"""Training state without pickle, for checkpoints: each process's random generators (torch's as tensors,
Python's and NumPy's as JSON) and nested state dicts (optimiser, schedule, scaler) as tagged JSON with their
tensors beside, so that reading a checkpoint never runs code."""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "RandomState",
    "decode_state",
    "device_rng",
    "encode_state",
    "parse_random_state",
    "random_state",
    "restore_random_state",
]


class RandomState(NamedTuple):
    """One process's saved generators."""

    tensors: dict[str, torch.Tensor]
    """torch generator states: ``torch`` (CPU) and, if saved on one, the device type's."""
    device: str
    python: tuple
    numpy: tuple


def device_rng(device: torch.device) -> Any:
    """The torch module holding the generator of ``device`` (``torch.cuda`` ...); None for the CPU."""
    module = None if device.type == "cpu" else getattr(torch, device.type, None)
    return module if hasattr(module, "get_rng_state") and hasattr(module, "set_rng_state") else None


def random_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's generator states: torch's as tensors, Python's and NumPy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    module = device_rng(device)
    if module is not None:
        tensors[device.type] = module.get_rng_state(device).cpu()
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    metadata = {
        "device": device.type if module is not None else "cpu",
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(cached)]),
    }
    return tensors, metadata


def restore_random_state(saved: RandomState, device: torch.device, source: str) -> None:
    """Set this process's generators to ``saved`` (from ``source``); a state saved on another device type
    restores all but that device's generator, with a warning."""
    random.setstate(saved.python)
    np.random.set_state(saved.numpy)
    torch.set_rng_state(saved.tensors["torch"])
    module = device_rng(device)
    here = device.type if module is not None else "cpu"
    if here != saved.device:
        warnings.warn(
            f"{source} was saved on {saved.device}, this run is on {here}: the {saved.device} random state "
            "cannot be restored, so the random draws (noise, timesteps, dropout) differ from an "
            "uninterrupted run",
            stacklevel=3,
        )
    elif module is not None:
        module.set_rng_state(saved.tensors[here], device)


def parse_random_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> RandomState:
    """What :func:`random_state` saved, each part checked on a private generator (the global ones are not
    touched); a malformed part raises ``KeyError``, ``TypeError``, ``ValueError`` or ``RuntimeError``."""
    version, internal, gauss = json.loads(metadata["python"])
    python = (version, tuple(internal), gauss)
    random.Random().setstate(python)
    name, keys, pos, has_gauss, cached = json.loads(metadata["numpy"])
    numpy_state = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    np.random.RandomState().set_state(numpy_state)
    torch.Generator().set_state(tensors["torch"])
    device = metadata["device"]
    if device != "cpu" and device not in tensors:
        raise KeyError(device)
    return RandomState(tensors, device, python, numpy_state)


def encode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` (a state dict) as tagged JSON; tensors go to ``tensors`` under a fresh name."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach()
        return {"tensor": name}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str | int) and not isinstance(k, bool) for k in value):
            raise TypeError(f"cannot store a mapping with keys {list(value)[:3]} in a checkpoint")
        return {"dict": [[k, encode_state(v, tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {type(value).__name__: [encode_state(v, tensors) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def decode_state(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unexpected node {str(node)[:80]}")
    ((kind, body),) = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: decode_state(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [decode_state(v, tensors) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "value" and (body is None or isinstance(body, bool | int | float | str)):
        return body
    raise ValueError(f"unexpected node kind {kind!r}")
