"""kohya sd-scripts ``networks.boft`` network arguments: parse a file's ``ss_network_*`` metadata as
sd-scripts does, and choose the arguments a written file records so that sd-scripts rebuilds its network.

The arguments, as sd-scripts takes them (``train_network.py``: ``--network_dim``, ``--network_dropout`` and
``--network_args``, recorded in a file's metadata as ``ss_network_dim``, ``ss_network_dropout`` and
``ss_network_args``, a JSON object of strings; ``networks/boft.py`` of kohya-ss/sd-scripts at 24d7025):

- sd-scripts' training path (``create_network``, then ``load_weights``: continuing training from a file)
  builds the network from ``--network_dim`` / ``--network_dropout`` / ``--network_args`` alone, not from the
  tensors, so a file's ``ss_*`` values rebuild its network only if they state every argument
  ``networks.boft`` reads (:data:`NETWORK_ARGS`, :class:`BoftNetworkArgs`). Its inference and merge paths
  (``create_network_from_weights``) and ``--dim_from_weights`` take the layout from the tensors.
- Parsing (``_create_network_args``; :func:`network_args_of`): ``str_to_int`` / ``str_to_float`` /
  ``str_to_bool`` of each value, ``parse_patterns`` of ``include_patterns`` / ``exclude_patterns``, aliases
  (``block_size``, ``block_num``, ``dropout``) read only without the ``boft_`` names. A value sd-scripts
  could not parse is refused (:class:`~boft_diffusion.io.format.AdapterFormatError`).
- The layers built: ``_pattern_allowed`` (``re.fullmatch`` on the layer's name in sd-scripts' model,
  include over exclude), ``enable_conv`` (ResNet / sampler blocks), ``_choose_boft_shape`` (the block
  layout; :meth:`BoftNetworkArgs.layout`).

Reading and writing the files themselves is :mod:`boft_diffusion.io.kohya`'s, which checks a file's
arguments against its tensors on reading (:func:`_rebuild_problems`, :func:`_warn_not_rebuilt`) and records
arguments that rebuild the layers written (:func:`_recorded_network_args`, :func:`_shared_name_problems`).
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .format import AdapterFormatError

__all__ = ["NETWORK_ARGS", "BoftNetworkArgs", "network_args_of"]


NETWORK_ARGS = (
    "boft_block_size",
    "boft_block_num",
    "boft_n_butterfly_factor",
    "boft_dropout",
    "enable_conv",
    "auto_adjust",
    "include_patterns",
    "exclude_patterns",
)
"""Every ``--network_args`` key ``networks/boft.py``'s ``_create_network_args`` reads (``block_size``,
``block_num`` and ``dropout`` are aliases, read only without the ``boft_`` names); the writer records each."""

_UNSET = (None, "", "None", "none")  # sd-scripts writes str(None) for unset --network_dim / _dropout
_CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")  # the blocks only enable_conv targets

_TEXT_ROOT = "text_model."
"""sd-scripts (transformers 4.44) names CLIP layers under ``text_model.``; transformers 5's ``CLIPTextModel``
has no such wrapper (``CLIPTextModelWithProjection`` keeps it)."""


@dataclass(frozen=True)
class BoftNetworkArgs:
    """What ``networks.boft``'s ``create_network`` builds a network from (``_create_network_args``)."""

    block_size: int
    """Requested block size ``b`` (``boft_block_size``, else ``--network_dim``, else 4); 0 with a block number."""
    block_num: int
    n_butterfly_factor: int
    dropout: float | None
    enable_conv: bool
    """Also target ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D`` and 3x3 convolutions."""
    auto_adjust: bool
    include_patterns: tuple[str, ...] | None
    exclude_patterns: tuple[str, ...] | None

    def builds(self, original_name: str) -> bool:
        """``BOFTNetwork._pattern_allowed``: ``re.fullmatch`` on the layer's name; include wins over exclude."""

        def matches(patterns: tuple[str, ...] | None) -> bool:
            return any(re.fullmatch(pattern, original_name) for pattern in patterns or ())

        if self.exclude_patterns and matches(self.exclude_patterns) and not matches(self.include_patterns):
            return False
        return matches(self.include_patterns) if self.include_patterns else True

    def layout(self, in_features: int) -> tuple[int, int] | None:
        """``(b, r)`` ``_choose_boft_shape`` picks for ``in_features`` without adjusting (``None``: it would
        have to adjust the block size, or refuse)."""
        if self.block_size and self.block_num:
            return None  # "Specify only one of boft_block_size or boft_block_num"
        if self.block_num:
            blocks = self.block_num
            return (in_features // blocks, blocks) if in_features % blocks == 0 else None
        size = self.block_size or 4  # sd-scripts: requested_block_size or 4
        return (size, in_features // size) if in_features % size == 0 else None


def _network_args(metadata: Mapping[str, str], source: str) -> dict[str, Any]:
    raw = metadata.get("ss_network_args")
    if not raw:
        return {}
    try:
        args = json.loads(raw)
    except (ValueError, RecursionError):
        raise AdapterFormatError(f"{source}: ss_network_args metadata is not JSON") from None
    if not isinstance(args, dict):
        raise AdapterFormatError(f"{source}: ss_network_args metadata is not a JSON object")
    return args


def _metadata_number(value: Any, kind: type, key: str, source: str) -> Any:
    """``str_to_int`` / ``str_to_float`` of sd-scripts (``None`` for an unset value); an unparsable value
    would stop sd-scripts' ``create_network`` and is refused here, naming the key."""
    if value in _UNSET:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise AdapterFormatError(f"{source}: {key} {value!r} in the metadata is not {what}") from None


def _patterns(value: Any, key: str, source: str) -> tuple[str, ...] | None:
    """``parse_patterns`` of sd-scripts (a Python list literal, else one pattern), each a valid regex."""
    if value is None:
        return None
    if isinstance(value, list):
        parsed = value
    else:
        try:
            parsed = ast.literal_eval(value)
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            parsed = [str(value)]
        parsed = parsed if isinstance(parsed, list) else [parsed]
    for pattern in parsed:
        try:
            re.compile(pattern)
        except (TypeError, re.error) as err:
            raise AdapterFormatError(
                f"{source}: ss_network_args {key}: {pattern!r} is no regex ({err})"
            ) from None
    return tuple(parsed)


def network_args_of(metadata: Mapping[str, str], source: str = "<metadata>") -> BoftNetworkArgs:
    """The network sd-scripts' ``create_network`` builds from a file's own metadata: ``_create_network_args``
    of ``networks/boft.py`` for ``--network_dim`` = ``ss_network_dim``, ``--network_dropout`` =
    ``ss_network_dropout`` and ``--network_args`` = ``ss_network_args``. A value sd-scripts could not parse, a
    dropout outside ``[0, 1)``, a negative block size or number and fewer than one factor are refused
    (:class:`AdapterFormatError` naming the file and the key)."""
    args = _network_args(metadata, source)

    def number(key: str, kind: type, alias: str | None = None) -> Any:  # kwargs.get(key, kwargs.get(alias))
        return _metadata_number(args.get(key, args.get(alias)), kind, key, source)

    dim = _metadata_number(metadata.get("ss_network_dim"), int, "ss_network_dim", source)
    block_size = number("boft_block_size", int, "block_size")
    block_num = number("boft_block_num", int, "block_num") or 0
    factors = number("boft_n_butterfly_factor", int)
    dropout = _metadata_number(metadata.get("ss_network_dropout"), float, "ss_network_dropout", source)
    if dropout is None:
        dropout = number("boft_dropout", float, "dropout")
    parsed = BoftNetworkArgs(
        block_size=block_size if block_size is not None else (dim if dim is not None else 4),
        block_num=block_num,
        n_butterfly_factor=1 if factors is None else factors,
        dropout=dropout,
        enable_conv=_sd_scripts_bool(args.get("enable_conv"), False),
        auto_adjust=_sd_scripts_bool(args.get("auto_adjust"), True),
        include_patterns=_patterns(args.get("include_patterns"), "include_patterns", source),
        exclude_patterns=_patterns(args.get("exclude_patterns"), "exclude_patterns", source),
    )
    _check_network_args(parsed, source)
    return parsed


def _sd_scripts_bool(value: Any, default: bool) -> bool:
    """``str_to_bool`` of sd-scripts: any text but ``1 / true / yes / y / on`` is false."""
    if value is None:
        return default
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "y", "on")


def _check_network_args(args: BoftNetworkArgs, source: str) -> None:
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise AdapterFormatError(f"{source}: dropout {args.dropout} in the metadata is not in [0, 1)")
    if args.block_size < 0 or args.block_num < 0 or args.n_butterfly_factor < 1:
        raise AdapterFormatError(
            f"{source}: ss_network_args give block size {args.block_size}, block number {args.block_num} and "
            f"{args.n_butterfly_factor} butterfly factors; sd-scripts needs sizes >= 0 and factors >= 1"
        )


# --- the layers they build: checked against a file read, chosen for a file written ----------------
def _sd_scripts_path(component: str, path: str) -> str:
    """The layer's name in sd-scripts' model (``original_name``): a text encoder's under ``text_model.``,
    where sd-scripts' CLIP classes (transformers 4) nest it, added where ``path`` lacks it."""
    if component != "unet" and not path.startswith(_TEXT_ROOT):
        return _TEXT_ROOT + path
    return path


@dataclass(frozen=True)
class _Layer:
    """One ``networks.boft`` module: the adapted layer and its layout ``boft_R (factors, blocks, b, b)``."""

    component: str
    path: str
    factors: int
    blocks: int
    block_size: int

    @property
    def original_name(self) -> str:
        """The name sd-scripts matches patterns against (``original_name``): the path in its model."""
        return _sd_scripts_path(self.component, self.path)

    @property
    def in_conv_block(self) -> bool:
        return self.component == "unet" and any(block in f".{self.path}" for block in _CONV_BLOCKS)


def _rebuild_problems(args: BoftNetworkArgs, layers: list[_Layer]) -> list[str]:
    """Why ``create_network`` with ``args`` would not build each of ``layers`` with its layout (what can be
    told without the model: layers it would build besides these are not seen here)."""
    problems = []
    for layer in layers:
        where = f"{layer.component}.{layer.path}"
        layout = args.layout(layer.blocks * layer.block_size)
        if not args.builds(layer.original_name):
            problems.append(f"{where} is left out by include_patterns / exclude_patterns")
        elif layer.in_conv_block and not args.enable_conv:
            problems.append(f"{where} is built only with enable_conv=true")
        elif layer.factors != args.n_butterfly_factor:
            problems.append(f"{where} has {layer.factors} butterfly factors, not {args.n_butterfly_factor}")
        elif layout != (layer.block_size, layer.blocks):
            problems.append(
                f"{where} has {layer.blocks} blocks of size {layer.block_size}, sd-scripts would build "
                + ("another layout" if layout is None else f"{layout[1]} of size {layout[0]}")
            )
    return problems


def _recorded_network_args(layers: list[_Layer], dropouts: set[float]) -> dict[str, str]:
    """``ss_network_args`` (strings, as ``--network_args`` gives them) that make ``create_network`` build
    exactly ``layers``: their shared layout (``boft_block_size=0`` with a block number: sd-scripts refuses
    both), ``enable_conv`` for ResNet / sampler layers, ``auto_adjust=false`` (every layer fits as it is) and
    ``include_patterns`` naming each layer (escaped, matched whole). A value the layers do not share is
    omitted; :func:`_rebuild_problems` names what that leaves unbuilt."""
    sizes, counts = {layer.block_size for layer in layers}, {layer.blocks for layer in layers}
    factors = {layer.factors for layer in layers}
    if len(sizes) != 1 and len(counts) == 1:
        block = {"boft_block_size": "0", "boft_block_num": str(counts.pop())}
    else:  # one block size, or none shared: the first layer's (the others are rebuild problems)
        block = {"boft_block_size": str(layers[0].block_size), "boft_block_num": "0"}
    names = sorted({re.escape(layer.original_name) for layer in layers})
    return {
        **block,
        **({"boft_n_butterfly_factor": str(factors.pop())} if len(factors) == 1 else {}),
        **({"boft_dropout": str(dropouts.pop())} if len(dropouts) == 1 else {}),
        "enable_conv": str(any(layer.in_conv_block for layer in layers)).lower(),
        "auto_adjust": "false",
        "include_patterns": str(names),
        "exclude_patterns": "[]",
    }


def _shared_name_problems(layers: list[_Layer], pipe: Any) -> list[str]:
    """SDXL: sd-scripts matches ``include_patterns`` against layer names in both text encoders alike, so a
    name adapted in one encoder is built in the other too where that has it (checked on ``pipe`` if given)."""
    encoders = ("text_encoder", "text_encoder_2")
    names = {c: {layer.original_name for layer in layers if layer.component == c} for c in encoders}
    problems = []
    for component, own in names.items():
        extra = (names["text_encoder"] | names["text_encoder_2"]) - own
        model = getattr(pipe, component, None)
        if model is not None:
            extra &= {_sd_scripts_path(component, name) for name, _ in model.named_modules()}
        if extra:
            where = "" if model is not None else " where it has them (pass pipe= to check)"
            problems.append(
                f"{component}: {len(extra)} layers it leaves alone, e.g. {min(extra)}, are adapted in the other "
                f"SDXL text encoder; include_patterns name them in both{where}"
            )
    return problems


def _warn_not_rebuilt(where: str, problems: list[str], note: str) -> None:
    """Warn that ``create_network`` would not rebuild a file's network from ``where``, naming the first problem."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    warnings.warn(
        f"{where} would not rebuild this network in sd-scripts' create_network (continuing training from the "
        f"file): {problems[0]}{more}. sd-scripts' inference and merge paths (create_network_from_weights) and "
        f"train_network.py --dim_from_weights take the layout from the tensors and load it exactly; {note}",
        stacklevel=3,
    )
