"""BOFT layers: thin ``nn.Module`` wrappers over :mod:`boft_diffusion.functional`.

A :class:`BOFTLayer` owns the original layer (``base_layer``, untouched unless merged) and any
number of named adapters, each a packed generator ``boft_R`` ``(m, r, b(b-1)/2)`` and a scale
``boft_s`` ``(out,)``, kept in float32 whatever the base dtype. With rotation ``M`` and scale ``s``
the adapted layer computes ``y = ((x M) W^T) ⊙ s + bias`` (bias excluded from the scale); merged
it is ``W' = (W M^T) ⊙ s[:, None]``.

The forward pass rotates whichever is smaller: the input rows ``x`` (``tokens × d``) or the weight
rows ``W`` (``out × d``, then a plain ``F.linear`` / ``F.conv2d``). Convolutions always rotate the
weight, on its flattened ``(in_channels / groups · kh · kw)`` axis. Gradients reach the generators
through :mod:`~boft_diffusion.functional`'s hand-written backward passes, which save only the
layer's input (as LoRA does), so BOFT trains in LoRA's memory.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import BlockLayout, BOFTConfig
from .functional import (
    apply_rotation,
    block_rotations,
    factor_permutations,
    multiplicative_dropout,
    num_free_entries,
)

__all__ = ["BOFTConv2d", "BOFTLayer", "BOFTLinear", "is_conv1d", "wrap_layer"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style linear with weight stored ``(in, out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class BOFTLayer(nn.Module):
    """Common state of the BOFT layers: named adapters, the active set, merge bookkeeping."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.layouts: dict[str, BlockLayout] = {}
        self.dropout: dict[str, float] = {}
        self.strength: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # --- shape hooks (per base layer type) ----------------------------------------------------
    @property
    def rotation_dim(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def weight_rows(self) -> torch.Tensor:
        """The base weight as rows ``(out, d)`` on the rotated axis (a view where possible)."""
        raise NotImplementedError

    def set_weight_rows(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: BOFTConfig, layer_name: str = "<layer>") -> None:
        """Create adapter ``name`` (identity at init unless ``config.init_weights`` is False)."""
        if name in self.boft_R:
            raise ValueError(f"Adapter {name!r} already exists on layer {layer_name!r}")
        layout = config.resolve_blocks(self.rotation_dim, layer_name)
        weight = self.weight_rows()
        generators = torch.zeros(layout.n_factors, layout.block_num, num_free_entries(layout.block_size))
        scale = torch.ones(self.out_features)
        if not config.init_weights:
            nn.init.normal_(generators, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[name] = nn.Parameter(generators.to(weight.device))
        self.boft_s[name] = nn.Parameter(scale.to(weight.device))
        self.layouts[name] = layout
        self.dropout[name] = config.boft_dropout
        self.strength[name] = 1.0
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"Adapter {name!r} is merged; unmerge it before deleting it")
        for store in (self.boft_R, self.boft_s, self.layouts, self.dropout, self.strength):
            if name in store:
                del store[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str], strengths: dict[str, float] | None = None) -> None:
        """Activate exactly ``names`` (those this layer holds) with optional strengths."""
        self.active_adapters = [n for n in names if n in self.boft_R]
        for n in self.active_adapters:
            self.strength[n] = float((strengths or {}).get(n, self.strength.get(n, 1.0)))

    def rotation(self, name: str, strength: float | None = None) -> tuple[torch.Tensor, tuple, torch.Tensor]:
        """Adapter ``name``'s orthogonal blocks ``(m, r, b, b)``, permutations and scale ``(out,)``.

        Strength ``w`` gives ``Cayley(w Q)`` and ``s(w) = 1 + w (s - 1)``; ``w = 0`` is exactly the base.
        """
        w = self.strength[name] if strength is None else strength
        layout = self.layouts[name]
        with torch.autocast(device_type=self.boft_R[name].device.type, enabled=False):
            blocks = block_rotations(self.boft_R[name], layout.block_size, w)
        if self.training and self.dropout[name] > 0:
            blocks = multiplicative_dropout(blocks, self.dropout[name])
        scale = self.boft_s[name] if w == 1.0 else 1.0 + w * (self.boft_s[name] - 1.0)
        perms = factor_permutations(layout.dim, layout.block_num, layout.block_size, layout.n_factors)
        return blocks, perms, scale

    def _pending_adapters(self) -> list[str]:
        """Active adapters whose rotation is applied in the forward pass (not merged)."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters and n in self.boft_R]

    def rotated_weight_rows(self, names: list[str]) -> torch.Tensor:
        """``W (M_k ⋯ M_1)^T ⊙ s`` for adapters ``names`` (in order), rows ``(out, d)``."""
        rows = self.weight_rows()
        scale = None
        for name in names:
            blocks, perms, s = self.rotation(name)
            rows = apply_rotation(
                rows.to(torch.promote_types(rows.dtype, blocks.dtype)), blocks, perms, transpose=True
            )
            scale = s if scale is None else scale * s
        return rows * scale[:, None].to(rows.dtype)

    # --- merge --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> list[str]:
        """Fold adapters into the base weight (default: the active ones). Returns those merged.

        Already merged adapters are skipped (merging twice changes nothing). With ``safe_merge``
        the result is checked for non-finite values before the weight is written.
        """
        names = [n for n in (self.active_adapters if names is None else names) if n in self.boft_R]
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return []
        base = self.weight_rows()
        merged = self.rotated_weight_rows(names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"Non-finite values in the merged weight: adapter(s) {names} look broken")
        self.set_weight_rows(merged.to(base.dtype))
        self.merged_adapters.extend(names)
        return names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge exactly: ``W = (W' / s) M`` (``M`` orthogonal), last merged first."""
        base = self.weight_rows()
        rows = base.float()
        for name in reversed(self.merged_adapters):
            blocks, perms, scale = self.rotation(name)
            rows = apply_rotation(rows / scale[:, None], blocks, perms)
        self.set_weight_rows(rows.to(base.dtype))
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

    @property
    def rotation_dim(self) -> int:
        w = self.base_layer.weight
        return w.shape[0] if self.fan_in_fan_out else w.shape[1]

    @property
    def out_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[1] if self.fan_in_fan_out else w.shape[0]

    def weight_rows(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def set_weight_rows(self, rows: torch.Tensor) -> None:
        w = self.base_layer.weight
        w.data.copy_(rows.t() if self.fan_in_fan_out else rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self._pending_adapters()
        if not names:
            return self.base_layer(x)
        bias = self.base_layer.bias
        bias = None if bias is None else bias.to(x.dtype)
        # Rotate whichever side has fewer rows: the weight (out × d, then a plain linear) or the
        # input (tokens × d, e.g. the 77 text tokens into cross-attention), in training too. In
        # training the weight path pays one more GEMM (the rotated weight's gradient, g^T x), the
        # input path more passes over activations (the rotation, the scale and their backward):
        # even at tokens = 3.2 × out (SD's 32×32 latents) the two cost the same on CPU, and at
        # more tokens the weight path wins.
        if x.numel() // x.shape[-1] >= self.out_features:
            return F.linear(x, self.rotated_weight_rows(names).to(x.dtype), bias)
        scale = None
        for name in reversed(names):  # x M_k ⋯ M_1
            blocks, perms, s = self.rotation(name)
            x = apply_rotation(x, blocks, perms)
            scale = s if scale is None else scale * s
        out = F.linear(x, self.weight_rows().to(x.dtype))
        scale = scale.to(x.dtype)
        return out * scale if bias is None else torch.addcmul(bias, out, scale)


class BOFTConv2d(BOFTLayer):
    """BOFT over ``nn.Conv2d`` (any kernel, stride, padding, dilation, groups, padding mode).

    The rotation acts on each filter's flattened ``(in_channels / groups, kh, kw)`` axis, the same
    rotation for every group.
    """

    @property
    def rotation_dim(self) -> int:
        w = self.base_layer.weight
        return w.shape[1] * w.shape[2] * w.shape[3]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[0]

    def weight_rows(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.reshape(w.shape[0], -1)

    def set_weight_rows(self, rows: torch.Tensor) -> None:
        w = self.base_layer.weight
        w.data.copy_(rows.reshape(w.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self._pending_adapters()
        if not names:
            return self.base_layer(x)
        base = self.base_layer
        weight = self.rotated_weight_rows(names).reshape(base.weight.shape).to(x.dtype)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return base._conv_forward(x, weight, bias)


def wrap_layer(module: nn.Module, config: BOFTConfig) -> BOFTLayer:
    """A BOFT layer around ``module`` (Linear, Conv1D or Conv2d); other types are a clear error."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        if config.fan_in_fan_out != is_conv1d(module):
            # As PEFT: the layer type decides; the flag only documents it.
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(module).__name__}; "
                f"using {is_conv1d(module)}",
                stacklevel=3,
            )
        return BOFTLinear(module)
    if isinstance(module, nn.Conv2d):
        return BOFTConv2d(module)
    raise TypeError(
        f"BOFT supports nn.Linear, transformers Conv1D and nn.Conv2d, not {type(module).__name__}"
    )
