"""One entry point for reading an adapter from any source: :func:`read_adapter`.

A source is this project's file or folder (:func:`~boft_diffusion.io.format.read_adapter_file`), a PEFT
adapter folder (:func:`~boft_diffusion.io.peft.read_peft_adapter`) or an in-memory state dict with
component-prefixed keys (``unet.<path>.boft_R``, ...), whose config is inferred from the tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..config import BOFTConfig
from ..functional import num_free_entries
from ..pipeline import BOFT_LOADABLE_COMPONENTS
from .format import AdapterFile, AdapterFormatError, check_finite, read_adapter_file
from .peft import is_peft_adapter, read_peft_adapter

__all__ = ["adapter_from_state_dict", "read_adapter"]


def read_adapter(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> AdapterFile:
    """Read and check an adapter: this project's file or folder, a PEFT folder, or a state dict.

    Raises :class:`AdapterFormatError` naming the file (or ``FileNotFoundError`` for a missing path).
    """
    if isinstance(source, Mapping):
        return adapter_from_state_dict(source)
    return read_peft_adapter(source) if is_peft_adapter(source) else read_adapter_file(source)


def adapter_from_state_dict(state: Mapping[str, torch.Tensor]) -> AdapterFile:
    """An adapter from component-prefixed tensors (``unet.<path>.boft_R``, ...), configs inferred."""
    check_finite(state, "<state dict>")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        comp, _, rest = key.partition(".")
        if comp not in BOFT_LOADABLE_COMPONENTS:
            raise AdapterFormatError(
                f"state dict key {key!r} does not start with a component {BOFT_LOADABLE_COMPONENTS}"
            )
        tensors.setdefault(comp, {})[rest] = tensor
    return AdapterFile(tensors, {c: _config_from_tensors(t) for c, t in tensors.items()})


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
