"""BOFT adapter -> LoRA file (truncated SVD of the weight change) and exact full-difference export.

UIs (ComfyUI, AUTOMATIC1111/Forge) and diffusers' ``pipe.load_lora_weights`` read LoRA files and full
weight differences, not BOFT. Per adapted layer, with ``W`` the pipeline's own base weight and ``W'``
the adapter's merged weight (:meth:`~boft_diffusion.layers.BOFTLayer.merged_weight`, float32):

- ``ΔW = W' - W`` and ``Δb = b' - b`` (:meth:`~boft_diffusion.layers.BOFTLayer.merged_bias`; non-zero
  only for the bias modes ``boft_only`` / ``all``);
- :func:`convert_to_lora`: the truncated SVD ``ΔW ≈ U_r S_r V_r^T`` (float64), ``up = U_r sqrt(S_r)``,
  ``down = sqrt(S_r) V_r^T``, alpha = rank (scale 1). The rank is fixed (``rank=r``) or, per layer, the
  smallest whose relative Frobenius error ``||ΔW - up down|| / ||ΔW||`` (measured on the stored float32
  factors) is at most ``budget``, capped by ``max_rank``. Conv2d layers use LoRA's conv layout (down
  ``(r, in, kh, kw)``, up ``(out, r, 1, 1)``).
- :func:`export_diff`: ``ΔW`` and ``Δb`` stored whole (float32), so that ``W + ΔW`` in float32 is the
  merged weight. Bit for bit wherever float32 holds such a ``ΔW``; where it holds none (``|W'|`` well
  below ``|W|``: ``W + d`` then moves on ``W``'s coarser grid) ``W + ΔW`` is the nearest reachable value,
  within one float32 ulp of ``max(|W|, |W'|)``; the report counts those elements (``inexact``).

The base is the pipeline's own: the adapter is applied to the base layers it was loaded into, so ``W``
is always the loaded base. An adapter file records the ``base_fingerprint`` of the base it was trained
on; pass it as ``base_fingerprint=`` and a different base is refused (:class:`BaseMismatchError`).

File layouts (one ``.safetensors``; a path not ending in ``.safetensors`` is a folder holding
``pytorch_lora_weights.safetensors``, the name ``load_lora_weights(folder)`` opens, or for a diff
``boft_diff.safetensors``):

- ``format="diffusers"`` (PEFT naming, what ``pipe.save_lora_weights`` writes):
  ``unet.<module path>.lora_A.weight`` (down) / ``.lora_B.weight`` (up), ``text_encoder.<path>...``,
  ``text_encoder_2.<path>...``, ``transformer.<path>...``; bias changes as ``.lora_B.bias`` (PEFT's
  ``lora_bias``). The LoRA config per component (``r``, ``lora_alpha`` = ``r``, ``rank_pattern``,
  ``alpha_pattern`` = ``rank_pattern``, ``target_modules``, ``lora_bias``) is in the safetensors
  metadata under ``lora_adapter_metadata`` (keys ``unet.r`` ...), as diffusers writes it, so every layer
  has scale 1 whatever rank it got.
- ``format="kohya"``: ``lora_unet_<diffusers module path, dots as underscores>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` (one value for the file, the most common rank; a layer of
  another rank has its ``up`` scaled by ``rank / alpha``, see :func:`_kohya_alpha`); ``lora_te_`` for an SD text encoder, ``lora_te1_`` /
  ``lora_te2_`` for SDXL's two. This is the SD 1.x naming kohya sd-scripts writes (it trains the
  diffusers UNet), that ComfyUI maps (``comfy/lora.py`` ``model_lora_keys_unet`` through
  ``unet_to_diffusers``), AUTOMATIC1111 maps (``convert_diffusers_name_to_compvis``) and diffusers
  converts (``_convert_non_diffusers_lora_to_diffusers``). A bias change goes out as ``<name>.diff_b``,
  which ComfyUI applies; diffusers' kohya converter refuses keys it does not know, so a kohya file
  with biases loads in the UIs only (the report's ``notes`` say so).
- :func:`export_diff`: the same kohya names with ``<name>.diff`` (the whole ``ΔW``, base layout) and
  ``<name>.diff_b`` — the full-weight patch ComfyUI (``comfy/lora.py`` ``load_lora``) and A1111
  (``extensions-builtin/Lora/network_full.py``) read.

Bad input is a :class:`ConvertError` (a ``ValueError``) and nothing is written; files are written
atomically (:mod:`boft_diffusion.atomic`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..atomic import atomic_file, staged_dir
from ..inject import adapter_configs, biases_trained_in_place, boft_layers, saved_modules
from ..io.kohya import kohya_module_name
from ..layers import BOFTConv2d, BOFTLayer
from ..pipeline import base_fingerprint as fingerprint_of
from ..pipeline import pipeline_components, same_base

__all__ = [
    "LORA_FILE_NAME",
    "BaseMismatchError",
    "ConvertError",
    "DiffReport",
    "LayerDelta",
    "LayerReport",
    "LoRAReport",
    "check_base_fingerprint",
    "convert_to_lora",
    "export_diff",
    "kohya_name",
    "layer_deltas",
    "lora_factors",
]

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
"""The file inside an output folder: the name diffusers' ``load_lora_weights(folder)`` looks for."""

DIFF_FILE_NAME = "boft_diff.safetensors"
"""The file inside an output folder of :func:`export_diff`."""

FORMATS = ("diffusers", "kohya")
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
"""Components ``load_lora_weights`` loads LoRA into (controlnets and control encoders are not)."""


class ConvertError(ValueError):
    """Bad input to a conversion (no adapter, a bad rank or budget, an existing output...)."""


class BaseMismatchError(ConvertError):
    """The pipeline's base is not the one the adapter was trained on (fingerprints differ)."""


# --- per-layer changes --------------------------------------------------------------------------
@dataclass
class LayerDelta:
    """One adapted layer's change: ``delta`` in the base layer's layout, ``bias`` (``None``: unchanged)."""

    component: str
    path: str
    delta: torch.Tensor
    bias: torch.Tensor | None
    conv: bool = False
    fan_in_fan_out: bool = False
    base: torch.Tensor | None = None
    merged: torch.Tensor | None = None
    base_bias: torch.Tensor | None = None
    merged_bias: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return f"{self.component}.{self.path}"

    def matrix(self) -> torch.Tensor:
        """``ΔW`` as ``(out, in)`` (conv: ``in = in_channels · kh · kw``), float64."""
        d = self.delta.double()
        if self.fan_in_fan_out:
            return d.t()
        return d.reshape(d.shape[0], -1)


def _selected(layer: BOFTLayer, adapter_name: str | None) -> list[str]:
    if adapter_name is None:
        return layer.pending_adapters()
    return [adapter_name] if adapter_name in layer.boft_R else []


@torch.no_grad()
def layer_deltas(pipe: Any, adapter_name: str | None = None, keep: bool = False) -> list[LayerDelta]:
    """``ΔW = W' - W`` (and ``Δb``) of every adapted layer, from the layers' own ``merged_weight``.

    ``adapter_name=None``: the active adapters (with their strengths); else that adapter alone (at its
    strength). ``keep``: also keep ``W`` and ``W'`` (float32) on each :class:`LayerDelta`. Raises
    :class:`ConvertError` when no component holds a BOFT adapter (or none named ``adapter_name``), or
    an adapter is merged into the weights (``W`` is then not the base).
    """
    components = pipeline_components(pipe)
    held = {c: list(adapter_configs(m)) for c, m in components.items() if adapter_configs(m)}
    if not held:
        raise ConvertError("The pipeline holds no BOFT adapter: load one first (load_boft_weights)")
    if adapter_name is not None and not any(adapter_name in names for names in held.values()):
        known = sorted({n for names in held.values() for n in names})
        raise ConvertError(f"No BOFT adapter named {adapter_name!r}; loaded: {known}")
    deltas = []
    for comp in held:
        for path, layer in boft_layers(components[comp]).items():
            if layer.merged:
                raise ConvertError(
                    f"{comp}.{path}: adapter(s) {layer.merged_adapters} are merged into the weights; "
                    "unmerge them (unmerge_boft) so that the base weights are known"
                )
            names = _selected(layer, adapter_name)
            if not names:
                continue
            base = layer.weight_from_rows(layer.weight_rows()).detach().float()
            merged = layer.merged_weight(names).float()
            bias = base_bias = merged_bias = None
            if layer.original_bias() is not None and any(n in layer.boft_bias for n in names):
                base_bias = layer.original_bias().detach().float()
                merged_bias = layer.merged_bias(names).float()
                bias = merged_bias - base_bias
                if not bool(bias.any()):  # a trained bias equal to the base: no change to write
                    bias = base_bias = merged_bias = None
            deltas.append(
                LayerDelta(
                    comp,
                    path,
                    merged - base,
                    bias,
                    conv=isinstance(layer, BOFTConv2d),
                    fan_in_fan_out=getattr(layer, "fan_in_fan_out", False),
                    base=base if keep else None,
                    merged=merged if keep else None,
                    base_bias=base_bias if keep else None,
                    merged_bias=merged_bias if keep else None,
                )
            )
            if isinstance(layer, BOFTConv2d) and layer.base_layer.groups != 1:
                raise ConvertError(f"{comp}.{path}: a grouped convolution has no LoRA layout")
    return deltas


@torch.no_grad()
def _own_bias_deltas(pipe: Any) -> dict[tuple[str, str], torch.Tensor]:
    """``{(component, module path): Δb}`` of biases trained in place by ``bias="all"`` (non-adapted modules)."""
    out = {}
    for comp, module in pipeline_components(pipe).items():
        trained = biases_trained_in_place(module)
        if not trained:
            continue
        names = {id(p): n for n, p in module.named_parameters()}
        for param, original in trained:
            name = names.get(id(param))
            if name is None or torch.equal(param, original):
                continue
            out[(comp, name.removesuffix(".bias"))] = (param.double() - original.double()).float()
    return out


def _not_exported(pipe: Any) -> list[str]:
    """Trained ``modules_to_save`` copies: whole modules, neither a LoRA nor a diff of an adapted layer."""
    return [
        f"{comp}.{name} (modules_to_save copy)"
        for comp, module in pipeline_components(pipe).items()
        for name, wrapper in saved_modules(module).items()
        if wrapper.copies
    ]


# --- the fingerprint check ------------------------------------------------------------------------
def check_base_fingerprint(pipe: Any, recorded: str | None) -> str:
    """Refuse a pipeline whose base is not the one an adapter recorded (``recorded``; ``None`` passes).

    Returns this base's fingerprint. A float32 base's float16 fingerprint counts as the same base (see
    :func:`~boft_diffusion.pipeline.base_fingerprint`). Take it before any adapter is merged. An adapter
    trained on a quantized base recorded a ``sha256-nolinear:`` fingerprint: the base's without its linear
    weights, compared as such (so a full-precision base passes).
    """
    if not recorded:
        return fingerprint_of(pipe)
    same, ours = same_base(pipe, recorded)
    if not same:
        raise BaseMismatchError(
            f"the adapter was trained on a base with fingerprint {recorded}; this pipeline's base has "
            f"fingerprint {ours}: load the adapter into the base it was trained on"
        )
    return ours


# --- the low-rank factors ---------------------------------------------------------------------------
def _relative_error(matrix: torch.Tensor, up: torch.Tensor, down: torch.Tensor, norm: float) -> float:
    if norm == 0.0:
        return 0.0 if not up.numel() else float(torch.linalg.matrix_norm(up.double() @ down.double()))
    return float(torch.linalg.matrix_norm(matrix - up.double() @ down.double()) / norm)


@torch.no_grad()
def lora_factors(
    matrix: torch.Tensor,
    rank: int | None = None,
    budget: float | None = None,
    max_rank: int | None = None,
    min_rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up (out, r), down (r, in), relative error)`` of a ``(out, in)`` matrix, float32 factors.

    Fixed ``rank``, or the smallest rank whose error on the float32 factors is at most ``budget``
    (never above ``max_rank`` nor ``min(out, in)``; at least ``min_rank``).
    """
    matrix = matrix.double()
    full = min(matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    norm = float(torch.linalg.matrix_norm(matrix))

    def factors(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = s[:r].sqrt()
        return (u[:, :r] * root).float().contiguous(), (root[:, None] * vh[:r]).float().contiguous()

    if rank is not None:
        up, down = factors(rank)
        return up, down, _relative_error(matrix, up, down, norm)
    cap = full if max_rank is None else min(max_rank, full)
    energy = s.square()
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[i] = sum_{j >= i} s_j^2
    total = float(energy.sum())
    r = 0
    while r < cap and total > 0 and math.sqrt(float(tail[r]) / total) > budget:
        r += 1
    r = max(r, min(min_rank, full))
    up, down = factors(r)
    error = _relative_error(matrix, up, down, norm)
    while error > budget and r < cap:  # float32 rounding of the factors: one more rank
        r += 1
        up, down = factors(r)
        error = _relative_error(matrix, up, down, norm)
    return up, down, error


# --- reports -----------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One layer of a conversion: its name (``component.path``), weight shape, rank and relative error."""

    name: str
    shape: tuple[int, ...]
    rank: int
    error: float
    bias: bool = False


@dataclass
class LoRAReport:
    """What :func:`convert_to_lora` wrote: per-layer ranks and errors, the file and its size."""

    path: Path
    format: str
    layers: list[LayerReport]
    file_size: int
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.layers), default=0.0)

    @property
    def total_rank(self) -> int:
        return sum(layer.rank for layer in self.layers)

    def table(self) -> str:
        """The per-layer table, then totals, as printed by ``boft-diffusion convert``."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>16}  {'rank':>4}  {'rel. error':>10}"]
        for layer in self.layers:
            shape = "x".join(str(n) for n in layer.shape)
            bias = "  +bias" if layer.bias else ""
            lines.append(f"{layer.name:<{width}}  {shape:>16}  {layer.rank:>4}  {layer.error:>10.2e}{bias}")
        lines.append(
            f"{len(self.layers)} layers, total rank {self.total_rank}, max rel. error {self.max_error:.2e}; "
            f"{self.path} ({self.format}, {self.file_size / 1024:.1f} KiB)"
        )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class DiffReport:
    """What :func:`export_diff` wrote; ``inexact``: elements where ``W + ΔW`` in float32 is not ``W'``."""

    path: Path
    layers: list[str]
    file_size: int
    inexact: int = 0
    max_abs_error: float = 0.0
    notes: list[str] = field(default_factory=list)


# --- key names ------------------------------------------------------------------------------------------
def kohya_name(component: str, path: str, components: Sequence[str] = ()) -> str:
    """The kohya / UI module name: ``lora_unet_down_blocks_0_attentions_0_..._to_q`` (dots as ``_``), as
    :func:`~boft_diffusion.io.kohya.kohya_module_name` gives it (``lora_te1_`` / ``lora_te2_`` when
    ``components`` holds a second text encoder; text-encoder paths under ``text_model.``, which the UIs
    expect and transformers 5 left out)."""
    try:
        return kohya_module_name(component, path, sdxl="text_encoder_2" in components)
    except ValueError:
        raise ConvertError(
            f"component {component!r} has no kohya / UI naming (unet, text_encoder, text_encoder_2 only); "
            "use format='diffusers'"
        ) from None


# --- output -----------------------------------------------------------------------------------------
def _check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConvertError(f"{out}: output path already exists; choose a new one or pass overwrite=True")
        if out.suffix != ".safetensors" and not out.is_dir():
            raise ConvertError(f"{out}: exists and is not a folder")
        if out.suffix == ".safetensors" and out.is_dir():
            raise ConvertError(f"{out}: exists and is a folder")
    return out


def _write(
    out: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    overwrite: bool,
    name: str = LORA_FILE_NAME,
) -> Path:
    """Write one safetensors file (``out`` itself, or ``out/<name>``) atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if out.suffix == ".safetensors":
        with atomic_file(out, replace=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return out
    with staged_dir(out, replace=overwrite) as folder, atomic_file(folder / name) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out / name


def _check_rank_args(rank: int | None, budget: float | None, max_rank: int | None) -> None:
    if (rank is None) == (budget is None):
        raise ConvertError("give exactly one of rank (a fixed rank) and budget (a relative error budget)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConvertError(f"rank must be a positive integer, not {rank!r}")
    if budget is not None and not (isinstance(budget, int | float) and 0.0 < budget < 1.0):
        raise ConvertError(f"budget must be a relative error in (0, 1), not {budget!r}")
    if max_rank is not None:
        if rank is not None:
            raise ConvertError("max_rank caps a budget's ranks; with a fixed rank leave it out")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ConvertError(f"max_rank must be a positive integer, not {max_rank!r}")


def _provenance(pipe: Any, adapter_name: str | None, kind: str) -> dict[str, str]:
    configs = {
        c: list(adapter_configs(m)) for c, m in pipeline_components(pipe).items() if adapter_configs(m)
    }
    return {
        "boft_diffusion.converted_from": "boft",
        "boft_diffusion.conversion": kind,
        "boft_diffusion.adapters": json.dumps(configs if adapter_name is None else adapter_name),
        "boft_diffusion.base_fingerprint": fingerprint_of(pipe),
    }


def convert_to_lora(
    pipe: Any,
    out: str | os.PathLike,
    rank: int | None = None,
    budget: float | None = None,
    max_rank: int | None = None,
    format: str = "diffusers",
    adapter_name: str | None = None,
    overwrite: bool = False,
    base_fingerprint: str | None = None,
) -> LoRAReport:
    """Write the BOFT adapter(s) held by ``pipe`` as a LoRA file; see the module docstring for layouts.

    ``rank`` (fixed) or ``budget`` (per-layer relative Frobenius error, in (0, 1), with an optional
    ``max_rank`` cap). ``adapter_name=None``: the active adapters as the pipeline applies them.
    ``out``: a ``.safetensors`` file, or a folder (``pytorch_lora_weights.safetensors`` inside); an
    existing one is refused unless ``overwrite``. ``base_fingerprint``: the fingerprint the adapter file
    records; a different base is refused. Nothing is written on any error.
    """
    _check_rank_args(rank, budget, max_rank)
    if format not in FORMATS:
        raise ConvertError(f"format must be one of {FORMATS}, not {format!r}")
    out = _check_output(out, overwrite)
    deltas = layer_deltas(pipe, adapter_name)
    check_base_fingerprint(pipe, base_fingerprint)
    _check_layers(deltas, format, rank)
    components = list(pipeline_components(pipe))
    factored = _factor_layers(deltas, rank, budget, max_rank, format, components)
    tensors = factored.tensors
    notes = [f"not exported: {item}" for item in _not_exported(pipe)]
    notes += _bias_changes(pipe, tensors, format, components)
    if format == "kohya":
        notes += _kohya_notes(tensors, factored.kohya_ranks)
    else:
        _zero_biases(tensors, deltas)
    metadata = {"format": "pt", **_provenance(pipe, adapter_name, "lora")}
    if format == "diffusers":
        metadata["lora_adapter_metadata"] = json.dumps(
            _lora_metadata(factored.configs, deltas), sort_keys=True
        )
    else:
        metadata["ss_network_module"] = "networks.lora"
    if not tensors:
        raise ConvertError("the adapter changes no weight (every layer is the identity): nothing to convert")
    path = _write(out, tensors, metadata, overwrite)
    return LoRAReport(path, format, factored.layers, path.stat().st_size, notes)


def _check_layers(deltas: list[Any], format: str, rank: int | None) -> None:  # noqa: A002
    """Every changed layer has a place in ``format``, and a fixed ``rank`` fits it."""
    allowed = DIFFUSERS_COMPONENTS if format == "diffusers" else ("unet", "text_encoder", "text_encoder_2")
    for delta in deltas:
        if delta.component not in allowed:
            raise ConvertError(
                f"{delta.name}: format {format!r} has no place for component {delta.component!r}"
            )
        if rank is not None and rank > min(delta.matrix().shape):
            raise ConvertError(
                f"rank {rank} is above min(out, in) = {min(delta.matrix().shape)} of layer {delta.name} "
                f"{tuple(delta.delta.shape)}"
            )


@dataclass
class _Factored:
    """The LoRA factors of every layer, keyed for the format, and what the report and metadata need."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    kohya_ranks: dict[str, int] = field(default_factory=dict)


def _factor_layers(
    deltas: list[Any], rank: int | None, budget: float | None, max_rank: int | None, format: str,  # noqa: A002
    components: list[str],
) -> _Factored:  # fmt: skip
    """Each layer's truncated SVD (:func:`lora_factors`) under its diffusers or kohya keys; kohya's alphas set."""
    out = _Factored()
    for delta in deltas:
        up, down, error = lora_factors(
            delta.matrix(), rank, budget, max_rank, min_rank=1 if delta.bias is not None else 0
        )
        r = up.shape[1]
        out.layers.append(LayerReport(delta.name, tuple(delta.delta.shape), r, error, delta.bias is not None))
        if r == 0 and delta.bias is None:
            continue  # nothing changed in this layer
        if delta.conv:
            kh, kw = delta.delta.shape[2:]
            down = down.reshape(r, -1, kh, kw)
            up = up.reshape(*up.shape, 1, 1)
        if format == "diffusers":
            key = delta.name
            out.tensors[f"{key}.lora_A.weight"] = down
            out.tensors[f"{key}.lora_B.weight"] = up
            if delta.bias is not None:
                out.tensors[f"{key}.lora_B.bias"] = delta.bias
            out.configs.setdefault(delta.component, {})[delta.path] = r
        else:
            key = kohya_name(delta.component, delta.path, components)
            out.tensors[f"{key}.lora_down.weight"] = down
            out.tensors[f"{key}.lora_up.weight"] = up
            out.kohya_ranks[key] = r
            if delta.bias is not None:
                out.tensors[f"{key}.diff_b"] = delta.bias
    if out.kohya_ranks:
        _kohya_alpha(out.tensors, out.kohya_ranks)
    return out


def _bias_changes(
    pipe: Any, tensors: dict[str, torch.Tensor], format: str, components: list[str]
) -> list[str]:  # noqa: A002
    """Biases of non-adapted modules (``bias="all"``): kohya's ``.diff_b`` keys, else a note that they are left out."""
    own = _own_bias_deltas(pipe)
    if own and format == "kohya":
        for (comp, path), db in own.items():
            tensors[f"{kohya_name(comp, path, components)}.diff_b"] = db
    elif own:
        return [
            f"not exported: {len(own)} biases of non-adapted modules (bias='all'); use format='kohya' or diff"
        ]
    return []


def _kohya_notes(tensors: dict[str, torch.Tensor], kohya_ranks: dict[str, int]) -> list[str]:
    """What a kohya file holds that diffusers' ``load_lora_weights`` cannot read."""
    notes = []
    if any(k.endswith(".diff_b") for k in tensors):
        notes.append(
            "bias changes are '.diff_b' keys: ComfyUI applies them; diffusers' load_lora_weights refuses them"
        )
    text = [k for k in kohya_ranks if k.startswith("lora_te")]
    if text and not any(k.endswith("out_proj") for k in text):
        notes.append(
            "no text-encoder out_proj: diffusers' load_lora_weights cannot read this kohya file (it takes the "
            "text encoder's format from 'to_out_lora' keys); the diffusers-format file loads there"
        )
    return notes


def _zero_biases(tensors: dict[str, torch.Tensor], deltas: list[Any]) -> None:
    """PEFT's ``lora_bias`` is per component: zero biases on a biased component's layers whose bias did not change."""
    biased = {d.component for d in deltas if d.bias is not None}
    for delta in deltas:
        key = f"{delta.name}.lora_B.bias"
        if delta.component in biased and key not in tensors and f"{delta.name}.lora_B.weight" in tensors:
            tensors[key] = torch.zeros(tensors[f"{delta.name}.lora_B.weight"].shape[0])


def _kohya_alpha(tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
    """One ``alpha`` for every layer (the most common rank): a layer of rank ``r`` then has scale
    ``alpha / r`` in every reader, so its ``up`` is multiplied by ``r / alpha`` to keep ``up down = ΔW_r``.

    Per-layer alphas (alpha = rank everywhere) would be the plainer file, but diffusers 0.42.1's kohya
    converter gives every layer the most common alpha (its ``alpha_pattern`` keys match no module), so
    per-layer alphas load there with wrong scales; ComfyUI and A1111 read ``alpha / rank`` per layer either way.
    """
    from collections import Counter

    alpha = Counter(ranks.values()).most_common(1)[0][0]
    for key, r in ranks.items():
        if r != alpha:
            tensors[f"{key}.lora_up.weight"] = tensors[f"{key}.lora_up.weight"] * (r / alpha)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))


def _lora_metadata(configs: dict[str, dict[str, int]], deltas: list[LayerDelta]) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata``: one PEFT ``LoraConfig`` per component, alpha = rank everywhere."""
    from collections import Counter

    out: dict[str, Any] = {}
    for comp, ranks in configs.items():
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {path: n for path, n in ranks.items() if n != r}
        config = {
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks),
            "lora_bias": any(d.bias is not None for d in deltas if d.component == comp),
            "use_dora": False,
        }
        out.update({f"{comp}.{k}": v for k, v in config.items()})
    return out


@torch.no_grad()
def _exact_delta(base: torch.Tensor, merged: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """A float32 ``d`` with ``base + d == merged`` in float32 wherever one exists near ``merged - base``.

    ``fl(merged - base)`` misses by one rounding where ``base`` and ``merged`` differ in magnitude; its
    neighbours (up to ``steps`` float32 spacings either way) are tried, element by element.
    """
    d = merged - base
    wrong = (base + d) != merged
    up, down = d, d
    for _ in range(steps):
        if not bool(wrong.any()):
            break
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        for candidate in (up, down):
            hit = wrong & ((base + candidate) == merged)
            d = torch.where(hit, candidate, d)
            wrong = wrong & ~hit
    return d


def export_diff(
    pipe: Any,
    out: str | os.PathLike,
    adapter_name: str | None = None,
    overwrite: bool = False,
    base_fingerprint: str | None = None,
) -> DiffReport:
    """Write the exact weight change of the BOFT adapter(s) as a full-difference patch file.

    Keys ``<kohya name>.diff`` (``ΔW`` in the base layer's layout, float32) and ``<kohya name>.diff_b``;
    ``W + ΔW`` in float32 equals the adapter's merged weight (the report counts elements where float32
    cannot hold such a ``ΔW``: ``inexact``, normally 0). Same refusals as :func:`convert_to_lora`.
    """
    out = _check_output(out, overwrite)
    deltas = layer_deltas(pipe, adapter_name, keep=True)
    check_base_fingerprint(pipe, base_fingerprint)
    components = list(pipeline_components(pipe))
    tensors: dict[str, torch.Tensor] = {}
    inexact, worst = 0, 0.0
    for delta in deltas:
        key = kohya_name(delta.component, delta.path, components)
        d = _exact_delta(delta.base, delta.merged)
        missed = (delta.base + d) != delta.merged
        inexact += int(missed.sum())
        if bool(missed.any()):
            worst = max(worst, float(((delta.base + d) - delta.merged).abs().max()))
        tensors[f"{key}.diff"] = d
        if delta.bias is not None:
            db = _exact_delta(delta.base_bias, delta.merged_bias)
            inexact += int(((delta.base_bias + db) != delta.merged_bias).sum())
            tensors[f"{key}.diff_b"] = db
    for (comp, path), db in _own_bias_deltas(pipe).items():
        tensors[f"{kohya_name(comp, path, components)}.diff_b"] = db
    if not tensors:
        raise ConvertError("the adapter changes no weight: nothing to export")
    notes = [f"not exported: {item}" for item in _not_exported(pipe)]
    metadata = {"format": "pt", **_provenance(pipe, adapter_name, "diff")}
    path = _write(out, tensors, metadata, overwrite, DIFF_FILE_NAME)
    return DiffReport(path, [d.name for d in deltas], path.stat().st_size, inexact, worst, notes)
