"""Writing merged checkpoints: a stock diffusers folder, or one original-layout ``.safetensors`` file.

Output is staged beside its destination and renamed into place (:mod:`boft_diffusion.atomic`): an
existing destination is refused, and an error leaves nothing behind (no file, no temporary, no
parent folder this call created).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_file, staged_dir
from ..families import FAMILIES, Family, SingleFileLayout, UnsupportedFamilyError, family_of
from ..inject import boft_layers
from ..pipeline import pipeline_components
from .merged import merged_pipeline, merged_state_dict
from .provenance import PROVENANCE_NAME, provenance, provenance_json, safetensors_metadata

__all__ = ["SINGLE_FILE_NAME", "export_merged", "parse_dtype"]

SINGLE_FILE_NAME = "model.safetensors"
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``, ``"bf16"``, ``"fp32"`` (or a ``torch.dtype``) -> ``torch.dtype``; ``None`` keeps the pipeline's."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def _add_safetensors_metadata(path: Path, extra: Mapping[str, str]) -> None:
    """Add metadata to a safetensors file by rewriting its header (tensor bytes are streamed unchanged)."""
    with atomic_file(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
        (size,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(size))
        header["__metadata__"] = {**(header.get("__metadata__") or {}), **extra}
        data = json.dumps(header, separators=(",", ":")).encode()
        data += b" " * (-len(data) % 8)  # keep the data section 8-byte aligned
        dst.write(struct.pack("<Q", len(data)) + data)
        shutil.copyfileobj(src, dst, 16 << 20)


def _export_diffusers(
    pipe: Any, folder: Path, dtype: torch.dtype | None, variant: str | None, prov: dict
) -> None:
    merged = merged_pipeline(pipe, dtype)
    merged.save_pretrained(folder, safe_serialization=True, variant=variant)
    metadata = safetensors_metadata(prov)
    for comp in {c for a in prov["adapters"] for c in a["components"]}:
        for file in sorted((folder / comp).glob("*.safetensors")):
            _add_safetensors_metadata(file, metadata)
    (folder / PROVENANCE_NAME).write_text(provenance_json(prov))


def _single_file_layout(pipe: Any) -> tuple[Family, SingleFileLayout]:
    """``pipe``'s family and its single-file layout; a pipeline none can write is a ``ValueError`` naming the
    families that have one."""
    try:
        family = family_of(pipe)
    except UnsupportedFamilyError:
        family = None
    layout = family.single_file if family is not None else None
    writable = [f for f in FAMILIES.values() if f.single_file is not None]
    components = pipeline_components(pipe)
    known = layout.components if layout else {c for f in writable for c in f.single_file.components}
    extra = sorted(c for c in components if c not in known)
    if (
        layout is None
        or extra
        or getattr(pipe, "vae", None) is None
        or any(c not in components for c in layout.components if c != "vae")
    ):
        supported = ", ".join(f"{f.title} checkpoints ({', '.join(f.single_file.held)})" for f in writable)
        raise ValueError(
            f"single_file export writes {supported}; "
            f"this pipeline has {sorted(components)}{' with ' + str(extra) if extra else ''}: "
            "use format='diffusers'"
        )
    return family, layout


def _single_file_state(pipe: Any, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``{original key: merged tensor}`` of ``pipe`` in its family's layout. An adapter on a component the
    file does not hold (whose merge the file would silently drop) is refused, pointing to ``diffusers``."""
    family, layout = _single_file_layout(pipe)
    dropped = sorted(
        name
        for name in layout.components
        if name not in layout.held
        and isinstance(module := getattr(pipe, name, None), torch.nn.Module)
        and boft_layers(module)
    )
    if dropped:
        raise ValueError(
            f"a {family.title} single file holds the {', '.join(layout.held)} only; the BOFT adapters on "
            f"{dropped} would be lost: use format='diffusers'"
        )
    modules = {name: getattr(pipe, name) for name in layout.held}
    states = {name: merged_state_dict(module, dtype) for name, module in modules.items()}
    return layout.to_original(states, {name: module.config for name, module in modules.items()})


def _export_single_file(pipe: Any, file: Path, dtype: torch.dtype | None, prov: dict) -> None:
    from safetensors.torch import save_file

    state = _single_file_state(pipe, dtype)
    save_file(
        {k: t.contiguous() for k, t in state.items()},
        file,
        metadata={"format": "pt", **safetensors_metadata(prov)},
    )


def export_merged(
    pipe: Any,
    out_dir: str | os.PathLike,
    format: str = "diffusers",  # noqa: A002 (the documented public name)
    dtype: str | torch.dtype | None = None,
    *,
    variant: str | None = None,
    base_model: str | None = None,
    extra_provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the pipeline with its active adapters merged; returns the written path.

    ``format="diffusers"``: a diffusers folder at ``out_dir``. ``format="single_file"``: one original-layout
    ``.safetensors`` file, in the layout of the pipeline's family (``Family.single_file``; SD 1.x/2.x:
    CompVis/LDM keys, SD 2.x's text encoder in OpenCLIP form; SDXL: Stability ``sgm`` keys; FLUX.1: BFL's
    transformer-only file; key maps in :mod:`boft_diffusion.families.keys`; other families are refused,
    naming these); ``out_dir`` ending in ``.safetensors``
    names the file itself, any other path is a new folder holding ``model.safetensors`` and
    ``boft_provenance.json``. ``dtype`` (``"fp16"``,
    ``"bf16"``, ``"fp32"`` or a ``torch.dtype``) casts the floating weights; ``variant`` names diffusers
    files ``*.<variant>.safetensors``. ``base_model`` and ``extra_provenance`` go into the provenance.

    ``out_dir`` must not exist. The pipeline is left exactly as it was. A broken adapter (a non-finite
    merged weight or bias) raises ``ValueError`` and nothing is written.
    """
    fmt = format.replace("-", "_")
    if fmt not in ("diffusers", "single_file"):
        raise ValueError(f"Unknown export format {format!r}; use 'diffusers' or 'single_file'")
    torch_dtype = parse_dtype(dtype)
    out = Path(out_dir)
    prov = provenance(
        pipe,
        base_model,
        format=fmt,
        dtype=str(torch_dtype).removeprefix("torch.") if torch_dtype else None,
        **dict(extra_provenance or {}),
    )
    if fmt == "diffusers":
        with staged_dir(out) as folder:
            _export_diffusers(pipe, folder, torch_dtype, variant, prov)
    elif out.suffix == ".safetensors":
        with atomic_file(out, replace=False) as file:
            _export_single_file(pipe, file, torch_dtype, prov)
    else:
        with staged_dir(out) as folder:
            _export_single_file(pipe, folder / SINGLE_FILE_NAME, torch_dtype, prov)
            (folder / PROVENANCE_NAME).write_text(provenance_json(prov))
    return out
