"""Quantized base layers: which backend a linear layer is quantized by, its weight at full precision,
and a new quantized layer holding a given weight.

BOFT rotates a layer's *input*, so a quantized base layer is called as it is (``base(x M)``) and never
written: training and sampling go through the backend's own kernel. What needs the weight itself
(merging, export, the LoRA conversion) reads it through :func:`dequantized_weight`. Merging in place is
the one write, and only on request (:func:`requantize`, 8-bit backends: it adds a rounding error the
caller reports; 4-bit is refused).

Backends are recognised by their classes' modules, so nothing here imports bitsandbytes, torchao or
optimum-quanto unless a layer of theirs is present:

- ``bnb-nf4`` / ``bnb-fp4``: bitsandbytes ``Linear4bit``; ``bnb-int8``: ``Linear8bitLt``;
- ``torchao-int8`` / ``torchao-fp8``: an ``nn.Linear`` whose weight is a torchao tensor subclass
  (``Int8Tensor``, ``Float8Tensor`` or an older ``AffineQuantizedTensor``);
- ``quanto-int8`` / ``quanto-fp8`` (and ``quanto-int4``): optimum-quanto's ``QLinear`` after ``freeze``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "BACKENDS",
    "QuantizedMergeError",
    "dequantized_weight",
    "is_quantized",
    "logical_dtype",
    "quantization_of",
    "quantize_linear",
    "recompute_in_backward",
    "requantize",
]


class QuantizedMergeError(ValueError):
    """Merging into a quantized base in place was not asked for, or cannot be done for its backend."""


def _module_of(obj: object) -> str:
    return type(obj).__module__ or ""


def quantization_of(module: nn.Module) -> str | None:
    """The backend a linear layer is quantized by (``bnb-nf4``, ``bnb-int8``, ``torchao-int8``, ...), or
    ``None`` for a plain layer."""
    if not isinstance(module, nn.Linear):
        return None
    cls = type(module)
    if _module_of(module).startswith("bitsandbytes"):
        if cls.__name__ == "Linear4bit" or hasattr(module.weight, "quant_state"):
            state = getattr(module.weight, "quant_state", None)
            kind = getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", "nf4")
            return f"bnb-{kind}"
        return "bnb-int8"
    if _module_of(module).startswith("optimum.quanto"):
        qtype = getattr(module, "weight_qtype", None)
        name = getattr(qtype, "name", str(qtype))
        return f"quanto-{'fp8' if 'float8' in name else name.removeprefix('q')}"
    weight = getattr(module, "weight", None)
    if weight is not None and _module_of(weight).startswith("torchao"):
        name = type(weight).__name__
        if "Float8" in name:
            return "torchao-fp8"
        if "Int8" in name or "Affine" in name:
            return "torchao-int8"
        return f"torchao ({name})"
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantization_of(module) is not None


def logical_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a quantized layer computes in (what its weight stands for); a plain layer's own."""
    weight = module.weight
    kind = quantization_of(module)
    if kind is None or weight.is_floating_point() and not kind.startswith("bnb"):
        return weight.dtype
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return state.dtype
    compute = getattr(module, "compute_dtype", None)
    if compute is not None:
        return compute
    bias = module.bias
    return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A quantized linear layer's weight ``(out, in)`` as a plain tensor in its :func:`logical_dtype` (a
    plain layer's weight itself)."""
    kind = quantization_of(module)
    if kind is None:
        return module.weight
    dtype = logical_dtype(module)
    if kind.startswith("bnb"):
        from diffusers.quantizers.bitsandbytes.utils import dequantize_bnb_weight

        state = getattr(module, "state", None) if kind == "bnb-int8" else None
        return dequantize_bnb_weight(module.weight, state=state, dtype=dtype).detach()
    weight = module.weight
    if hasattr(weight, "dequantize"):
        return weight.dequantize().to(dtype)
    raise TypeError(f"Cannot read the weight of a {type(module).__name__} quantized by {kind}")


BACKENDS = ("bnb-nf4", "bnb-int8", "torchao-int8", "torchao-fp8", "quanto-int8", "quanto-fp8")
"""The backends :func:`quantize_linear` builds (those ``model.quantization.backend`` names)."""


@torch.no_grad()
def quantize_linear(layer: nn.Linear, backend: str) -> nn.Module:
    """``layer`` (a frozen plain Linear) quantized by ``backend`` in memory, as that library's loader leaves
    it: torchao's ``quantize_`` with its weight-only config, quanto's ``quantize`` then ``freeze``, or a
    bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` quantized on the move to the layer's device. The result may
    be ``layer`` itself (torchao quantizes in place)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}: one of {', '.join(BACKENDS)}")
    layer.requires_grad_(False)
    if backend.startswith("torchao"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(layer, Float8WeightOnlyConfig() if backend == "torchao-fp8" else Int8WeightOnlyConfig())
        return layer
    if backend.startswith("quanto"):
        from optimum.quanto import freeze, qfloat8, qint8, quantize

        holder = nn.Sequential(layer)  # quanto replaces children: give the layer a parent
        quantize(holder, weights=qfloat8 if backend == "quanto-fp8" else qint8)
        freeze(holder)
        return holder[0]
    import bitsandbytes as bnb

    device, bias = layer.weight.device, layer.bias is not None
    shape = (layer.in_features, layer.out_features)
    if backend == "bnb-nf4":
        fresh = bnb.nn.Linear4bit(
            *shape, bias=bias, compute_dtype=layer.weight.dtype, quant_type="nf4", device="meta"
        )
        fresh.weight = bnb.nn.Params4bit(layer.weight.data.cpu(), requires_grad=False, quant_type="nf4")
    else:
        fresh = bnb.nn.Linear8bitLt(*shape, bias=bias, has_fp16_weights=False, device="meta")
        fresh.weight = bnb.nn.Int8Params(layer.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        fresh.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    return fresh.to(device)


@torch.no_grad()
def requantize(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new layer quantized as ``module`` is (same backend), holding ``weight`` and ``bias``
    (:func:`quantize_linear`).

    Raises :class:`QuantizedMergeError` for 4-bit layers (merging into a 4-bit base in place is refused:
    export the merged model at full precision instead) and for a format it does not know.
    """
    kind = quantization_of(module)
    if kind not in BACKENDS or kind == "bnb-nf4":
        four_bit = (
            " (4-bit: the rounding would undo a good part of what the adapter changed)"
            if "4" in str(kind)
            else ""
        )
        raise QuantizedMergeError(
            f"merging into a {kind} base in place is not supported{four_bit}; export the merged model instead "
            "(boft-diffusion export, export_merged): it is written at full precision"
        )
    out_features, in_features = weight.shape
    plain = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=logical_dtype(module)
    )
    plain.weight.copy_(weight)
    if bias is not None:
        plain.bias.copy_(bias)
    return quantize_linear(plain, kind)


def recompute_in_backward(
    module: nn.Module,
    backends: tuple[str, ...] = ("torchao-int8", "torchao-fp8"),
    skip: Collection[nn.Module] = (),
) -> int:
    """Make every linear layer of ``module`` quantized by one of ``backends`` keep only its input for the
    backward pass and run again there (``torch.utils.checkpoint``, non-reentrant) while gradients are
    recorded; returns how many layers.

    torchao's weight-only layers otherwise save a dequantized copy of the weight for the gradient of their
    input: on SD 1.5's UNet (``boft-diffusion bench --memory --preset sd15``, CPU) a training step then adds
    1.5 GB over the model instead of 0.7 GB, giving back most of what the int8 base saved (BOFT's own
    layers recompute their whole rotated call: see :class:`~boft_diffusion.layers.BOFTLinear`). optimum-quanto
    saves no such copy (same step, with or without this): it is left as it is. The cost is one more forward
    pass of each patched layer in the backward pass. Frozen layers only; the patch is the instance's
    ``forward`` (the state dict and the module tree are unchanged). ``skip``: layers left as they are (the
    bases of BOFT layers, whose whole rotated call is recomputed already).
    """
    count = 0
    skipped = {id(m) for m in skip}
    for layer in module.modules():
        if quantization_of(layer) not in backends or "forward" in layer.__dict__ or id(layer) in skipped:
            continue
        layer.forward = _recomputed(layer.forward)
        count += 1
    return count


def _recomputed(forward):
    def recomputed(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(forward, x, *args, use_reentrant=False, **kwargs)
        return forward(x, *args, **kwargs)

    recomputed.__wrapped__ = forward
    return recomputed
