"""``BOFTConfig``: the adapter's hyperparameters, PEFT's field names and defaults, with validation.

Rules that need a layer's size (divisibility, butterfly depth) are checked per layer by
:meth:`BOFTConfig.resolve_blocks`, whose errors name the layer and the numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["BOFTConfig", "BlockLayout"]

BIAS_MODES = ("none", "all", "boft_only")


@dataclass(frozen=True)
class BlockLayout:
    """Resolved butterfly layout of one adapted axis: ``block_num * block_size == dim``."""

    dim: int
    block_size: int
    block_num: int
    n_factors: int


@dataclass
class BOFTConfig:
    """Configuration of a BOFT adapter (same fields and defaults as PEFT's ``BOFTConfig``).

    Exactly one of ``boft_block_size`` (``b``) and ``boft_block_num`` (``r``) is non-zero; the
    other is derived per layer from its input size ``d = r * b``.
    """

    boft_block_size: int = 4
    """Size ``b`` of each orthogonal block (0 to derive it from ``boft_block_num``)."""
    boft_block_num: int = 0
    """Number ``r`` of blocks per butterfly factor (0 to derive it from ``boft_block_size``)."""
    boft_n_butterfly_factor: int = 1
    """Number ``m`` of butterfly factors; 1 is plain block-diagonal OFT."""
    target_modules: list[str] | str | None = None
    """Module-name suffixes (e.g. ``["to_q", "to_k"]``) or one regex matched against full names."""
    boft_dropout: float = 0.0
    """Multiplicative dropout: probability of replacing a block of one factor by the identity."""
    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as ``(in, out)`` (transformers' ``Conv1D``)."""
    bias: str = "none"
    """Which biases train: ``none``, ``all`` (every bias of the model) or ``boft_only`` (adapted layers)."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved beside the adapter."""
    init_weights: bool = True
    """True: identity init (generators 0, scales 1). False: random init (for tests)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt layers with these indices (the number after ``layers_pattern`` in the name)."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list the indices refer to (e.g. ``"layers"``, ``"transformer_blocks"``)."""

    def __post_init__(self) -> None:
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(
                "Set exactly one of boft_block_size and boft_block_num "
                f"(got boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num})"
            )
        if self.boft_block_size < 0 or self.boft_block_num < 0:
            raise ValueError(
                f"boft_block_size and boft_block_num must be >= 0 (got {self.boft_block_size}, {self.boft_block_num})"
            )
        if not isinstance(self.boft_n_butterfly_factor, int) or self.boft_n_butterfly_factor < 1:
            raise ValueError(
                f"boft_n_butterfly_factor must be an integer >= 1 (got {self.boft_n_butterfly_factor})"
            )
        if not 0.0 <= self.boft_dropout < 1.0:
            raise ValueError(f"boft_dropout must be in [0, 1) (got {self.boft_dropout})")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES} (got {self.bias!r})")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only meaningful together with layers_to_transform")
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, tuple | set):
            self.modules_to_save = list(self.modules_to_save)

    def resolve_blocks(self, dim: int, layer_name: str = "<layer>") -> BlockLayout:
        """Block size/number for an axis of size ``dim``, with PEFT's rules and named errors."""
        m = self.boft_n_butterfly_factor
        depth = m - 1
        where = f"layer {layer_name!r} (input dim {dim})"
        if self.boft_block_num:
            r = self.boft_block_num
            if dim % r:
                raise ValueError(f"{where}: input dim {dim} is not divisible by boft_block_num={r}")
            if depth and (depth > int(math.log2(r)) or r % 2**depth):
                raise ValueError(
                    f"{where}: boft_n_butterfly_factor={m} is too large for boft_block_num={r} "
                    f"(boft_block_num must be a multiple of 2^{depth}={2**depth})"
                )
            b = dim // r
        else:
            b = self.boft_block_size
            if dim % b:
                raise ValueError(f"{where}: input dim {dim} is not divisible by boft_block_size={b}")
            if depth and dim % (b * 2**depth):
                raise ValueError(
                    f"{where}: boft_n_butterfly_factor={m} with boft_block_size={b} needs the input dim to be a "
                    f"multiple of {b} * 2^{depth} = {b * 2**depth}"
                )
            r = dim // b
        if depth and (r % 2 or b % 2):
            raise ValueError(
                f"{where}: butterfly factors > 1 need an even block size and block number "
                f"(got boft_block_size={b}, boft_block_num={r})"
            )
        return BlockLayout(dim=dim, block_size=b, block_num=r, n_factors=m)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BOFTConfig:
        """Build from a dict; an unknown key is an error that names it (and the closest valid key)."""
        names = cls.field_names()
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
                raise ValueError(f"Unknown BOFTConfig key {key!r}{hint}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> BOFTConfig:
        return cls.from_dict(json.loads(text))
