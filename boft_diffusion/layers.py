"""BOFT layers: thin ``nn.Module`` wrappers over :mod:`boft_diffusion.functional`.

A :class:`BOFTLayer` owns the original layer (``base_layer``, untouched unless merged) and any
number of named adapters, each a packed generator ``boft_R`` ``(m, r, b(b-1)/2)``, a scale
``boft_s`` ``(out,)`` and, when it trains biases, its own full bias ``boft_bias`` ``(out,)``
(initialised as a copy of the base bias), all kept in float32 whatever the base dtype. With rotation
``M``, scale ``s`` and adapter bias ``b_a`` the adapted layer computes
``y = ((x M) W^T) ⊙ s + b + w (b_a - b)`` (bias excluded from the scale; ``w`` the strength, summed
over active adapters); merged it is ``W' = (W M^T) ⊙ s[:, None]`` and ``b' = b + w (b_a - b)``.
The base bias ``b`` is written by :meth:`BOFTLayer.merge` only, and :meth:`BOFTLayer.unmerge` puts it
back bit for bit.

The forward pass rotates whichever is smaller: the input rows ``x`` (``tokens × d``) or the weight
rows ``W`` (``out × d``, then a plain ``F.linear`` / ``F.conv2d``). Convolutions always rotate the
weight, on its flattened ``(in_channels / groups · kh · kw)`` axis. Gradients reach the generators
through :mod:`~boft_diffusion.functional`'s hand-written backward passes, which save only the
layer's input (as LoRA does), so BOFT trains in LoRA's memory. Multiplicative dropout is applied in
the training forward pass only: rotations, merged weights, merge and unmerge are deterministic in
any module mode.

Without gradients (sampling), each adapter's rotation is built once and reused: its Cayley blocks,
collapsed to one block product (:func:`~boft_diffusion.functional.collapse_rotation`), are cached on
the layer and rebuilt when the generators or scale change (their version counters or storage: any
in-place write, optimizer step, ``load_state_dict`` or ``.to()``), the strength changes, or the
adapter is deleted. A write through ``param.data`` bypasses the version counter; call
:meth:`BOFTLayer.clear_rotation_cache` after one. The cache is small (``d · S`` floats per adapter,
``S = b · 2^(m-1)``) and never used while gradients are recorded, under ``torch.compile``, on
sharded (``DTensor``) parameters, or where ``cache_rotations`` is off: FSDP2 all-gathers into the
same unsharded parameters without bumping their version counters, so the recipes switch it off
when they shard (:func:`~boft_diffusion.inject.set_rotation_cache`; do the same around your own
``fully_shard``).

Over a quantized base (bitsandbytes, torchao, optimum-quanto; :mod:`~boft_diffusion.quantized`) a
:class:`BOFTLinear` always rotates the input and calls the quantized layer as it is, ``(base(x M) - b) ⊙ s
+ b_a``; in training that whole call is recomputed in the backward pass, so only ``x`` is kept. The weight
is read (dequantized) only to merge, export or convert; merging writes a requantized layer, and only when
asked (``requantize=True``; 4-bit bases are refused), keeping the original for :meth:`BOFTLayer.unmerge`.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import BlockLayout, BOFTConfig
from .functional import (
    apply_rotation,
    block_rotations,
    collapse_rotation,
    factor_permutations,
    multiplicative_dropout,
    num_free_entries,
)
from .quantized import QuantizedMergeError, dequantized_weight, logical_dtype, quantization_of
from .quantized import requantize as _requantize

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = None

__all__ = ["BOFTConv2d", "BOFTLayer", "BOFTLinear", "MergePlan", "is_conv1d", "layer_class", "wrap_layer"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style linear with weight stored ``(in, out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _at_least_float32(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


@dataclass
class MergePlan:
    """A merge computed and checked by :meth:`BOFTLayer.plan_merge`, not yet written.

    ``weight`` and ``bias`` are in the base layer's layout and dtype (``bias`` ``None``: unchanged). On a
    quantized base merged with ``requantize``, ``replacement`` is the new quantized layer holding them and
    ``error`` the relative error its rounding adds, ``‖Q(W') - W'‖ / ‖W'‖``.
    """

    names: list[str]
    weight: torch.Tensor
    bias: torch.Tensor | None
    replacement: nn.Module | None = None
    error: float | None = None


class BOFTLayer(nn.Module):
    """Common state of the BOFT layers: named adapters, the active set, merge bookkeeping."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # A new module starts in training mode; wrapping one of a pipeline in eval mode (any loader does)
        # must not switch multiplicative dropout on at inference: the wrapper takes the layer's mode.
        self.train(base_layer.training)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_bias = nn.ParameterDict()
        # The base bias as it was before the first merge (merge writes the bias; unmerge restores it).
        self.register_buffer("unmerged_bias", None, persistent=False)
        self.layouts: dict[str, BlockLayout] = {}
        self.dropout: dict[str, float] = {}
        self.strength: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Inference rotations by (adapter, transposed): parameters, stamp, (blocks, perms, transpose, scale).
        self._rotation_cache: dict[tuple[str, bool], tuple] = {}
        self.cache_rotations = True
        # The backend of a quantized base layer (None: plain): called as it is, never written in place.
        self.quantization = quantization_of(base_layer)
        # The quantized base as it was before the first merge with requantize (a plain list: not a submodule,
        # so it is neither in the state dict nor moved by .to()); unmerge puts it back exactly, on the current device.
        self._premerge_base: list[nn.Module] = []

    # --- shape hooks (per base layer type) ----------------------------------------------------
    @staticmethod
    def shape_of(base_layer: nn.Module) -> tuple[int, int]:
        """``(d, out)`` of a base layer of this type: the rotated axis and the output size."""
        raise NotImplementedError

    @property
    def rotation_dim(self) -> int:
        return self.shape_of(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return self.shape_of(self.base_layer)[1]

    def weight_rows(self) -> torch.Tensor:
        """The base weight as rows ``(out, d)`` on the rotated axis (a view where possible)."""
        raise NotImplementedError

    def weight_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_rows`: rows ``(out, d)`` -> the base layer's weight layout."""
        raise NotImplementedError

    def set_weight_rows(self, rows: torch.Tensor) -> None:
        if self.quantization:
            raise QuantizedMergeError(
                f"the base layer is quantized ({self.quantization}); it is never written in place"
            )
        self.base_layer.weight.data.copy_(self.weight_from_rows(rows))

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self, name: str, config: BOFTConfig, layer_name: str = "<layer>", layout: BlockLayout | None = None
    ) -> None:
        """Create adapter ``name`` (identity at init unless ``config.init_weights`` is False).

        ``layout``: the block layout already resolved for this layer (default: resolved here).
        With ``config.bias != "none"`` the adapter gets its own bias, a float32 copy of the base bias.
        """
        if name in self.boft_R:
            raise ValueError(f"Adapter {name!r} already exists on layer {layer_name!r}")
        if layout is None:
            layout = config.resolve_blocks(self.rotation_dim, layer_name)
        device = self.base_layer.weight.device
        generators = torch.zeros(layout.n_factors, layout.block_num, num_free_entries(layout.block_size))
        scale = torch.ones(self.out_features)
        if not config.init_weights:
            nn.init.normal_(generators, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[name] = nn.Parameter(generators.to(device))
        self.boft_s[name] = nn.Parameter(scale.to(device))
        base_bias = self.original_bias()
        if config.bias != "none" and base_bias is not None:
            self.boft_bias[name] = nn.Parameter(
                base_bias.detach().to(_at_least_float32(base_bias), copy=True)
            )
        self.layouts[name] = layout
        self.dropout[name] = config.boft_dropout
        self.strength[name] = 1.0
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"Adapter {name!r} is merged; unmerge it before deleting it")
        for store in (self.boft_R, self.boft_s, self.boft_bias, self.layouts, self.dropout, self.strength):
            if name in store:
                del store[name]
        self.clear_rotation_cache()
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str], strengths: dict[str, float] | None = None) -> None:
        """Activate exactly ``names`` (those this layer holds) with optional strengths.

        A merged adapter keeps the strength it was merged with (unmerge inverts exactly that).
        """
        active = [n for n in names if n in self.boft_R]
        wanted = {n: float((strengths or {}).get(n, self.strength.get(n, 1.0))) for n in active}
        changed = [n for n in self.merged_adapters if n in wanted and wanted[n] != self.strength[n]]
        if changed:
            raise ValueError(f"Adapter(s) {changed} are merged; unmerge them before changing their strength")
        self.active_adapters = active
        self.strength.update(wanted)

    def pending_adapters(self) -> list[str]:
        """Active adapters whose rotation the forward pass applies (not merged, layer not disabled)."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters and n in self.boft_R]

    def rotation(
        self, name: str, strength: float | None = None, dropout: bool = False
    ) -> tuple[torch.Tensor, tuple, torch.Tensor]:
        """Adapter ``name``'s orthogonal blocks ``(m, r, b, b)``, permutations and scale ``(out,)``.

        Strength ``w`` gives ``Cayley(w Q)`` and ``s(w) = 1 + w (s - 1)``; ``w = 0`` is exactly the base.
        Deterministic unless ``dropout`` (the training forward pass passes ``self.training``): then
        multiplicative dropout replaces random blocks by the identity.
        """
        w = self.strength[name] if strength is None else strength
        layout = self.layouts[name]
        with torch.autocast(device_type=self.boft_R[name].device.type, enabled=False):
            blocks = block_rotations(self.boft_R[name], layout.block_size, w)
        if dropout and self.dropout[name] > 0:
            blocks = multiplicative_dropout(blocks, self.dropout[name])
        scale = self.boft_s[name] if w == 1.0 else 1.0 + w * (self.boft_s[name] - 1.0)
        perms = factor_permutations(layout.dim, layout.block_num, layout.block_size, layout.n_factors)
        return blocks, perms, scale

    def clear_rotation_cache(self) -> None:
        """Drop the cached inference rotations (rebuilt on the next forward pass without gradients)."""
        self._rotation_cache.clear()

    def rotation_operator(
        self, name: str, transpose: bool, dropout: bool = False
    ) -> tuple[torch.Tensor, tuple, bool, torch.Tensor]:
        """Adapter ``name``'s rotation as :func:`~boft_diffusion.functional.apply_rotation` takes it,
        ``(blocks, perms, transpose, scale)``, for ``x M`` (or ``x M^T`` with ``transpose``).

        Without gradients (and without dropout in effect) the result is cached until the adapter's
        parameters or strength change (see the module docstring); otherwise it is built here, in
        the autograd graph, and ``apply_rotation`` collapses it per call.
        """
        generators, scale_param = self.boft_R[name], self.boft_s[name]
        cacheable = self.cache_rotations and not (
            torch.is_grad_enabled()
            or (dropout and self.dropout[name] > 0)
            or torch.compiler.is_compiling()
            or _is_sharded(generators)
        )
        if not cacheable:
            blocks, perms, scale = self.rotation(name, dropout=dropout)
            return blocks, perms, transpose, scale
        stamp = (
            generators._version, generators.data_ptr(), generators.device,
            scale_param._version, scale_param.data_ptr(), self.strength[name],
        )  # fmt: skip
        cached = self._rotation_cache.get((name, transpose))
        # The same parameter objects (weak references: a replaced one may reuse the old address)
        # with the same version, storage and strength.
        if (
            cached is not None
            and cached[0]() is generators
            and cached[1]() is scale_param
            and cached[2] == stamp
        ):
            return cached[3]
        blocks, perms, scale = self.rotation(name)
        operator = (*collapse_rotation(blocks, perms, transpose), scale)
        self._rotation_cache[(name, transpose)] = (
            weakref.ref(generators),
            weakref.ref(scale_param),
            stamp,
            operator,
        )
        return operator

    def rotated_weight_rows(self, names: list[str], dropout: bool = False) -> torch.Tensor:
        """``W (M_k ⋯ M_1)^T ⊙ s`` for adapters ``names`` (in order), rows ``(out, d)``."""
        rows = self.weight_rows()
        scale = None
        for name in names:
            blocks, perms, transpose, s = self.rotation_operator(name, True, dropout)
            rows = apply_rotation(
                rows.to(torch.promote_types(rows.dtype, blocks.dtype)), blocks, perms, transpose=transpose
            )
            scale = s if scale is None else scale * s
        return rows * scale[:, None].to(rows.dtype)

    def original_bias(self) -> torch.Tensor | None:
        """The base layer's bias without any merged adapter (``None`` if it has no bias)."""
        return self.base_layer.bias if self.unmerged_bias is None else self.unmerged_bias

    def adapted_bias(self, names: list[str]) -> torch.Tensor | None:
        """The current base bias plus ``Σ_a w_a (b_a - b)`` over adapters ``names`` holding a bias.

        ``b`` is the unmerged base bias. One adapter at ``w = 1`` gives ``b_a`` exactly, ``w = 0``
        leaves the bias exactly as it is. ``None`` when the base layer has no bias.
        """
        bias = self.base_layer.bias
        if bias is None:
            return None
        reference = self.original_bias()
        for name in names:
            w = self.strength[name]
            if name not in self.boft_bias or w == 0.0:
                continue
            if w == 1.0 and bias is reference:
                bias = self.boft_bias[name]
            else:
                bias = bias + w * (self.boft_bias[name] - reference)
        return bias

    # --- merged weights -------------------------------------------------------------------------
    def _unmerged(self, adapter_names: list[str] | None) -> list[str]:
        if adapter_names is None:
            return self.pending_adapters()
        return [n for n in adapter_names if n in self.boft_R and n not in self.merged_adapters]

    @torch.no_grad()
    def merged_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """The base weight with adapters folded in, ``W' = (W M^T) ⊙ s``, as a new tensor.

        In the base layer's own layout: Linear ``(out, in)``, Conv1D ``(in, out)``, Conv2d
        ``(out, in / groups, kh, kw)``; float32 or wider. ``adapter_names=None``: the pending
        adapters (active, not merged, layer enabled); adapters already merged are skipped (the weight
        holds them). Deterministic in any module mode (no dropout).
        """
        names = self._unmerged(adapter_names)
        if names:
            return self.weight_from_rows(self.rotated_weight_rows(names))
        rows = self.weight_rows()
        return self.weight_from_rows(rows.to(_at_least_float32(rows), copy=True))

    @torch.no_grad()
    def merged_bias(self, adapter_names: list[str] | None = None) -> torch.Tensor | None:
        """The base bias with the adapters' biases folded in (:meth:`adapted_bias`), as a new tensor.

        Same adapter selection as :meth:`merged_weight`; float32 or wider; ``None`` without a base bias.
        """
        bias = self.adapted_bias(self._unmerged(adapter_names))
        return None if bias is None else bias.detach().to(_at_least_float32(bias), copy=True)

    # --- merge --------------------------------------------------------------------------------
    @torch.no_grad()
    def plan_merge(
        self,
        names: list[str] | None = None,
        layer_name: str = "<layer>",
        dtype: torch.dtype | None = None,
        requantize: bool = False,
    ) -> MergePlan | None:
        """Compute and check the merge of ``names`` (default: the active adapters); write nothing.

        ``None`` when there is nothing to merge (already merged adapters are skipped). The result is
        in ``dtype`` (default: the base layer's, as merging writes it; export may ask for another; a
        quantized base's is the dtype it computes in). Raises ``ValueError`` (naming the layer and
        adapters) if the merged weight or bias, in that dtype, holds a non-finite value.

        ``requantize`` (a quantized base only): also build the quantized layer :meth:`apply_merge` puts in
        its place, and measure the error its rounding adds; 4-bit bases raise :class:`QuantizedMergeError`.
        """
        names = self._unmerged(self.active_adapters if names is None else names)
        if not names:
            return None
        base = self.base_layer
        weight = self.merged_weight(names).to(dtype or logical_dtype(base))
        bias = None
        if base.bias is not None and (self.quantization or any(n in self.boft_bias for n in names)):
            bias = self.merged_bias(names).to(dtype or base.bias.dtype)
        if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise ValueError(
                f"Non-finite values in the merged weight of {layer_name!r}: adapter(s) {names} look broken; "
                "nothing was merged"
            )
        if not (requantize and self.quantization):
            return MergePlan(names, weight, bias)
        try:
            replacement = _requantize(base, weight, bias)
        except QuantizedMergeError as err:
            raise QuantizedMergeError(f"layer {layer_name!r}: {err}") from None
        exact = weight.float()
        error = (dequantized_weight(replacement).float() - exact).norm() / exact.norm().clamp_min(1e-12)
        return MergePlan(names, weight, bias, replacement, float(error))

    @torch.no_grad()
    def apply_merge(self, plan: MergePlan) -> None:
        """Write a plan of this layer made by :meth:`plan_merge` (the base bias is saved for unmerge).

        A quantized base is replaced by the plan's requantized layer (kept aside for :meth:`unmerge`); a
        plan without one raises :class:`QuantizedMergeError`.
        """
        base = self.base_layer
        if self.quantization and plan.replacement is None:
            raise QuantizedMergeError(
                f"the base layer is quantized ({self.quantization}): merging in place needs requantize=True"
            )
        if not self.merged_adapters and base.bias is not None:
            self.unmerged_bias = base.bias.detach().clone()
        if plan.replacement is not None:
            if not self._premerge_base:
                self._premerge_base.append(base)
            self.base_layer = plan.replacement
            self.quantization = quantization_of(plan.replacement)
            self.clear_rotation_cache()
            self.merged_adapters.extend(plan.names)
            return
        base.weight.data.copy_(plan.weight)
        if plan.bias is not None:
            base.bias.data.copy_(plan.bias)
        self.merged_adapters.extend(plan.names)

    def merge(
        self, names: list[str] | None = None, layer_name: str = "<layer>", requantize: bool = False
    ) -> list[str]:
        """Fold adapters into the base weight and bias (default: the active ones). Returns those merged.

        Already merged adapters are skipped (merging twice changes nothing). The merged values are
        checked before anything is written: a non-finite one raises and leaves the layer untouched. A
        quantized base needs ``requantize`` (see :meth:`plan_merge`).
        """
        if self.quantization and not requantize and self._unmerged(names):
            raise QuantizedMergeError(
                f"layer {layer_name!r} has a quantized base ({self.quantization}): merging in place would round "
                "the merged weight again; pass requantize=True, or export the merged model at full precision"
            )
        plan = self.plan_merge(names, layer_name, requantize=requantize)
        if plan is None:
            return []
        self.apply_merge(plan)
        return plan.names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge: ``W = (W' / s) M`` (``M`` orthogonal), last merged first; the bias exactly.

        A quantized base merged with requantize gets its original layer back, bit for bit.
        """
        if self._premerge_base:
            device = self.base_layer.weight.device  # the pipeline may have moved since the merge
            self.base_layer = self._premerge_base.pop().to(device)
            self.quantization = quantization_of(self.base_layer)
            self.unmerged_bias = None
            self.merged_adapters.clear()
            self.clear_rotation_cache()
            return
        base = self.weight_rows()
        rows = base.float()
        for name in reversed(self.merged_adapters):
            blocks, perms, scale = self.rotation(name)
            rows = apply_rotation(rows / scale[:, None], blocks, perms)
        self.set_weight_rows(rows.to(base.dtype))
        if self.unmerged_bias is not None:
            self.base_layer.bias.data.copy_(self.unmerged_bias)
            self.unmerged_bias = None
        self.merged_adapters.clear()

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def extra_repr(self) -> str:
        return f"adapters={list(self.boft_R)}, active={self.active_adapters}, merged={self.merged_adapters}"


class BOFTLinear(BOFTLayer):
    """BOFT over ``nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)

    @staticmethod
    def shape_of(base_layer: nn.Module) -> tuple[int, int]:
        if isinstance(base_layer, nn.Linear):  # a quantized weight may be packed (bitsandbytes 4-bit)
            return base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        return (w.shape[0], w.shape[1]) if is_conv1d(base_layer) else (w.shape[1], w.shape[0])

    def weight_rows(self) -> torch.Tensor:
        if self.quantization:
            return dequantized_weight(self.base_layer)
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def weight_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.t() if self.fan_in_fan_out else rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.pending_adapters()
        if not names:
            return self.base_layer(x)
        bias = self.adapted_bias(names)
        bias = None if bias is None else bias.to(x.dtype)
        # Rotate whichever side has fewer rows: the weight (out × d, then a plain linear) or the
        # input (tokens × d, e.g. the 77 text tokens into cross-attention), in training too. In
        # training the weight path pays one more GEMM (the rotated weight's gradient, g^T x), the
        # input path more passes over activations (the rotation, the scale and their backward):
        # even at tokens = 3.2 × out (SD's 32×32 latents) the two cost the same on CPU, and at
        # more tokens the weight path wins.
        # A quantized base is always called as it is, on the rotated input (its kernel, its weight unread).
        # In training the whole rotated call keeps only its input for the backward pass and runs again
        # there, so the step holds what the weight path would (the rotated input, the library's saved
        # tensors and the unscaled output would otherwise stay for every adapted layer).
        if self.quantization:
            if torch.is_grad_enabled():
                return checkpoint(self._input_path, x, names, bias, use_reentrant=False)
            return self._input_path(x, names, bias)
        if x.numel() // x.shape[-1] >= self.out_features:
            return F.linear(x, self.rotated_weight_rows(names, self.training).to(x.dtype), bias)
        return self._input_path(x, names, bias)

    def _input_path(self, x: torch.Tensor, names: list[str], bias: torch.Tensor | None) -> torch.Tensor:
        """``(x M_k ⋯ M_1) W^T ⊙ s + b_a``: the input rotated, then the base weight (a quantized base: the
        layer itself, less its own bias)."""
        scale = None
        for name in reversed(names):  # x M_k ⋯ M_1
            blocks, perms, transpose, s = self.rotation_operator(name, False, self.training)
            x = apply_rotation(x, blocks, perms, transpose)
            scale = s if scale is None else scale * s
        if self.quantization:
            out = self.base_layer(x)
            if self.base_layer.bias is not None:
                out = out - self.base_layer.bias.to(out.dtype)
        else:
            out = F.linear(x, self.weight_rows().to(x.dtype))
        scale = scale.to(x.dtype)
        return out * scale if bias is None else torch.addcmul(bias, out, scale)


class BOFTConv2d(BOFTLayer):
    """BOFT over ``nn.Conv2d`` (any kernel, stride, padding, dilation, groups, padding mode).

    The rotation acts on each filter's flattened ``(in_channels / groups, kh, kw)`` axis, the same
    rotation for every group.
    """

    @staticmethod
    def shape_of(base_layer: nn.Module) -> tuple[int, int]:
        w = base_layer.weight
        return w.shape[1] * w.shape[2] * w.shape[3], w.shape[0]

    def weight_rows(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.reshape(w.shape[0], -1)

    def weight_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(self.base_layer.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.pending_adapters()
        if not names:
            return self.base_layer(x)
        base = self.base_layer
        weight = self.weight_from_rows(self.rotated_weight_rows(names, self.training)).to(x.dtype)
        bias = self.adapted_bias(names)
        bias = None if bias is None else bias.to(x.dtype)
        return base._conv_forward(x, weight, bias)


def _is_sharded(tensor: torch.Tensor) -> bool:
    """A ``DTensor`` (an FSDP2 shard): its local storage is not the whole parameter."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def layer_class(module: nn.Module, layer_name: str = "<layer>") -> type[BOFTLayer]:
    """The BOFT layer type that adapts ``module`` (Linear, Conv1D or Conv2d); others are an error naming it."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return BOFTLinear
    if isinstance(module, nn.Conv2d):
        return BOFTConv2d
    raise TypeError(
        f"layer {layer_name!r}: BOFT supports nn.Linear, transformers Conv1D and nn.Conv2d, "
        f"not {type(module).__name__}"
    )


def wrap_layer(module: nn.Module, config: BOFTConfig, layer_name: str = "<layer>") -> BOFTLayer:
    """A BOFT layer (no adapter yet) around ``module``, of the type :func:`layer_class` names."""
    cls = layer_class(module, layer_name)
    if cls is BOFTLinear and config.fan_in_fan_out != is_conv1d(module):
        # As PEFT: the layer type decides; the flag only documents it.
        warnings.warn(
            f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(module).__name__}; "
            f"using {is_conv1d(module)}",
            stacklevel=4,
        )
    return cls(module)
