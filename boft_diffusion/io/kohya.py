"""kohya sd-scripts (and LyCORIS-through-sd-scripts) network files: recognise them, read and write
sd-scripts' BOFT networks exactly, and refuse what this project cannot represent exactly.

The layout, as sd-scripts writes it (``<Network>.save_weights``: a flat ``state_dict()`` of the network,
saved with ``safetensors.torch.save_file``):

- Module names are the target's qualified name with ``.`` turned into ``_`` behind a prefix:
  ``lora_unet_`` (UNet, or the transformer of Flux / SD3), ``lora_te_`` (SD 1.x/2.x text encoder),
  ``lora_te1_`` / ``lora_te2_`` (SDXL), ``lora_te3_`` (SD3's T5), ``oft_unet_`` (sd-scripts' OFT),
  ``lycoris_`` (LyCORIS' own prefix). Keys are ``<module name>.<tensor>``; a name holds no ``.``.
- BOFT (``networks/boft.py`` of kohya-ss/sd-scripts at 24d7025, PR #2428; names from
  ``networks/orthogonal_common.py``: ``native_prefix`` = ``f"{root_prefix}.{original_name}".replace(".", "_")``,
  prefixes ``lora_unet`` / ``lora_te`` / ``lora_te1`` / ``lora_te2``): per module ``boft_R``
  ``(m, r, b, b)`` float (full matrices ``A``, ``BOFTModule.__init__``) and ``boft_s`` ``(out, 1)`` (Linear
  *and* Conv2d; ``(1, out)`` is accepted on load, ``_adapt_state``). The math (``cayley_batch``,
  ``get_rotation_and_scale``, ``_rotated_weight``): ``Q = (A - A^T) / 2`` in float32,
  ``R = solve(I + Q, I - Q, left=False) = (I - Q)(I + Q)^-1``; factor ``i`` is
  ``P_i blockdiag(R_i) P_i^T`` with ``P_i = perm2mat(block_butterfly_perm(d, r // 2**i, b // 2, m - 1))``
  (PEFT's code), ``M = F_{m-1} ... F_0`` and ``W' = (M W_flat^T)^T * s`` with ``W_flat`` the weight
  reshaped ``(out, -1)`` (Conv2d: ``in * kh * kw`` in PyTorch order). That is this project's convention
  exactly (input side, same Cayley, same permutations, same scale), and PEFT's tensor layout, so the
  conversion is :func:`~boft_diffusion.io.peft` 's (``pack_skew`` / ``unpack_skew``: only ``Q`` matters).
  Targets: ``Linear`` / ``Conv2d`` children of ``Transformer2DModel`` (UNet), ``ResnetBlock2D`` /
  ``Downsample2D`` / ``Upsample2D`` (3x3 convs, ``enable_conv``; always when loading from weights),
  ``CLIPAttention`` / ``CLIPSdpaAttention`` / ``CLIPMLP`` (text encoders). The block layout of each
  module is inferred from ``boft_R``'s shape when sd-scripts loads a file (``_infer_from_state``), and
  must satisfy ``_valid_boft_shape``.
- OFTv2 (``networks/oft_v2.py``): per module ``oft_R.weight`` ``(r or 1, b(b-1)/2)`` (upper-triangle
  entries, ``Q = M - M^T``), rotation by a 5-term Neumann series, never the exact Cayley transform.
- OFT (``networks/oft.py``, SD / SDXL UNet only): per module ``oft_blocks`` ``(r, b, b)`` with
  ``b = out_features // r`` and ``alpha``, a 0-d buffer (the constraint). ``networks/oft_flux.py`` stores
  ``oft_blocks.<i>`` per split of a fused ``qkv`` projection.
- LoRA (``networks/lora.py``): ``lora_down.weight``, ``lora_up.weight``, ``alpha``. LoHa ``hada_w1_a`` ...,
  LoKr ``lokr_w1`` ..., (IA)^3 ``on_input``, GLoRA ``a1.weight``; full differences ``diff`` / ``diff_b``.
- Metadata: ``ss_network_module`` (``networks.boft``, ``networks.oft_v2``, ``networks.oft``,
  ``networks.lora``, ``lycoris.kohya``), ``ss_network_dim``, ``ss_network_alpha``, ``ss_network_dropout``,
  ``ss_network_args`` (JSON of strings: the ``--network_args``), ``sshs_model_hash`` / ``sshs_legacy_hash``
  (hashes of the tensors). The ``networks.boft`` arguments (``ss_network_dim`` / ``ss_network_dropout`` /
  ``ss_network_args``: parsed as sd-scripts does, chosen when writing) are
  :mod:`~boft_diffusion.io.kohya_args`'s.

What maps, and what is refused. ``networks.boft`` files map exactly (:func:`read_kohya_adapter`,
:func:`write_kohya_adapter`), for module names in diffusers' layout (SD 1.x / 2.x UNet, every CLIP text
encoder). sd-scripts' SDXL UNet has the original (``input_blocks`` / ``middle_block`` / ``output_blocks``)
names; mapping them needs the UNet's block structure and is not done: such files are refused, and an
SDXL adapter with UNet weights is not written. ``networks.oft_v2`` is refused: its rotation is the
truncated Neumann series ``I + 2Q + 2Q^2 + 2Q^3 + Q^4`` (``use_cayley_neumann`` is always on), which
is not orthogonal and equals no Cayley transform, so no adapter here gives the same weights (its COFT
projection and shared blocks would map; the series does not). ``networks.oft`` and LyCORIS' OFT/BOFT
rotate the weight's *output rows*, ``W' = blockdiag(R)^T W``; this project (like PEFT and
``networks.boft``) rotates the *input*, and no input rotation equals an output rotation for every
weight. sd-scripts' ``multiplier`` (not stored in files) interpolates weights, ``W + (W' - W) * k``;
at ``k = 1`` (the default) that is ``W'``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_file
from ..families import family_of
from ..functional import block_size_of, unpack_skew
from .format import AdapterFile, AdapterFormatError, check_finite
from .kohya_args import (
    _TEXT_ROOT,
    _Layer,
    _rebuild_problems,
    _recorded_network_args,
    _sd_scripts_path,
    _shared_name_problems,
    _warn_not_rebuilt,
    network_args_of,
)
from .peft import _convert_from_peft

__all__ = [
    "BOFT_MODULE",
    "KOHYA_PREFIXES",
    "OFT_V2_MODULE",
    "KohyaNetwork",
    "is_kohya_adapter",
    "kohya_component",
    "kohya_network_kind",
    "read_kohya_adapter",
    "is_kohya_keys",
    "kohya_module_name",
    "read_kohya_network",
    "safetensors_header",
    "write_kohya_adapter",
]

BOFT_MODULE = "networks.boft"
OFT_V2_MODULE = "networks.oft_v2"

KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "oft_unet_": "unet",
    "lycoris_": "unet",
}
"""Module-name prefix -> the diffusers pipeline component it addresses (``unet`` also stands for a DiT's
``transformer``; :func:`kohya_component` tells them apart by the block names)."""

_TRANSFORMER_BLOCKS = ("double_blocks_", "single_blocks_", "joint_blocks_", "transformer_blocks_")

# Tensor names (after the module name) that identify each network type, checked in this order.
_KIND_LEAVES = (
    ("BOFT", ("boft_R", "boft_s")),
    ("OFT", ("oft_blocks", "oft_diag", "oft_R.weight")),
    ("LoRA", ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight")),
    ("LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    ("LoKr", ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")),
    ("(IA)^3", ("on_input",)),
    ("GLoRA", ("a1.weight", "b1.weight")),
    ("full difference", ("diff", "diff_b")),
    ("norm", ("w_norm", "b_norm")),
)


@dataclass
class KohyaNetwork:
    """A kohya network file: its type, ``{module name: {tensor name: shape}}`` and metadata."""

    kind: str
    variant: str
    shapes: dict[str, dict[str, tuple[int, ...]]]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def components(self) -> list[str]:
        """The pipeline components the module names address, sorted."""
        return sorted({kohya_component(name) for name in self.shapes})


def kohya_component(module_name: str) -> str:
    """``lora_te2_text_model_...`` -> ``text_encoder_2``; ``lora_unet_double_blocks_0_...`` -> ``transformer``."""
    prefix = next(p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if module_name.startswith(p))
    component = KOHYA_PREFIXES[prefix]
    rest = module_name[len(prefix) :]
    return "transformer" if component == "unet" and rest.startswith(_TRANSFORMER_BLOCKS) else component


def _is_module_key(key: str) -> bool:
    """``<prefix><target path with _>.<tensor>``: a kohya key (the name itself holds no ``.``)."""
    name, dot, _ = key.partition(".")
    return bool(dot) and any(name.startswith(p) and len(name) > len(p) for p in KOHYA_PREFIXES)


def _kind_of_leaf(leaf: str) -> str | None:
    if leaf.startswith("oft_blocks."):  # networks/oft_flux.py: a ParameterList, one per qkv split
        return "OFT"
    return next((kind for kind, names in _KIND_LEAVES if leaf in names), None)


def kohya_network_kind(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(kind, variant)`` of a kohya-named file from its keys, shapes and metadata.

    ``kind``: ``OFT``, ``LoRA``, ``LoHa``, ``LoKr``, ``(IA)^3``, ``GLoRA``, ``full difference``, ``norm``
    or ``unknown``. ``variant`` says which implementation wrote an OFT (``networks.oft``,
    ``networks.oft_flux``, ``LyCORIS diag-OFT``, ``LyCORIS BOFT``), else the ``ss_network_module``.
    """
    leaves = {key.partition(".")[2] for key in shapes}
    module = metadata.get("ss_network_module", "")
    found = {_kind_of_leaf(leaf) for leaf in leaves}
    kind = next((name for name, _ in _KIND_LEAVES if name in found), "unknown")
    if kind == "BOFT":
        return kind, BOFT_MODULE
    if kind != "OFT":
        return kind, module
    if "oft_R.weight" in leaves:
        return kind, OFT_V2_MODULE
    blocks = [shape for key, shape in shapes.items() if key.partition(".")[2] == "oft_blocks"]
    if any(leaf.startswith("oft_blocks.") for leaf in leaves):
        return kind, "networks.oft_flux"
    if any(len(shape) == 4 for shape in blocks):
        return kind, "LyCORIS BOFT"
    if module.startswith("lycoris") or "rescale" in leaves or "oft_diag" in leaves:
        return kind, "LyCORIS diag-OFT"
    return kind, "networks.oft"


def safetensors_header(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file, without reading the tensors."""
    try:
        with safe_open(file, framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
            return shapes, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{file}: not a readable safetensors file ({err})") from err


def is_kohya_keys(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    return bool(shapes) and all(_is_module_key(key) for key in shapes)


def is_kohya_adapter(path: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` file whose every key is ``<kohya module name>.<tensor>``."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        shapes, _ = safetensors_header(path)
    except AdapterFormatError:
        return False
    return is_kohya_keys(shapes)


def read_kohya_network(path: str | os.PathLike) -> KohyaNetwork:
    """What a kohya network file holds (types and shapes only; tensors are not read)."""
    file = Path(path)
    shapes, metadata = safetensors_header(file)
    if not is_kohya_keys(shapes):
        raise AdapterFormatError(
            f"{file}: not a kohya network file (its keys are not lora_unet_..., lora_te..., oft_unet_... names)"
        )
    kind, variant = kohya_network_kind(shapes, metadata)
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name, _, leaf = key.partition(".")
        modules.setdefault(name, {})[leaf] = shape
    return KohyaNetwork(kind, variant, modules, metadata, str(file))


def _check_oft_layout(network: KohyaNetwork) -> None:
    """Every module of an sd-scripts OFT file holds ``oft_blocks`` ``(r, b, b)`` and a 0-d ``alpha``."""
    for name, leaves in network.shapes.items():
        blocks = leaves.get("oft_blocks")
        if (
            blocks is None
            or len(blocks) != 3
            or blocks[1] != blocks[2]
            or set(leaves) - {"oft_blocks", "alpha"}
        ):
            raise AdapterFormatError(
                f"{network.source}: module {name} holds {dict(sorted(leaves.items()))}; sd-scripts OFT stores "
                "oft_blocks (blocks, b, b) and a scalar alpha per module"
            )


def read_kohya_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read a kohya network file as a BOFT adapter: ``networks.boft`` files exactly, the rest refused.

    Another network type (LoRA, LoHa, LoKr, ...) is not OFT/BOFT. ``networks.oft_v2`` uses a Neumann
    series, sd-scripts' and LyCORIS' OFT/BOFT rotate the weight's output rows: no exact mapping exists
    (module docstring). A broken file (unreadable, non-finite, malformed) is refused as such first.
    Raises :class:`AdapterFormatError` naming the file; nothing is returned that could be loaded wrongly.
    """
    network = read_kohya_network(path)
    module = f" ({network.variant})" if network.variant else ""
    if network.kind == "unknown":
        leaves = sorted({leaf for leaves in network.shapes.values() for leaf in leaves})
        raise AdapterFormatError(
            f"{network.source}: kohya module names, but tensors of no known network type ({leaves[:6]})"
        )
    if network.kind == "BOFT":
        return _read_boft(network)
    if network.kind != "OFT":
        raise AdapterFormatError(
            f"{network.source}: this is a kohya {network.kind} network{module}, not OFT/BOFT: "
            "load_boft_weights reads BOFT adapters only; load it with diffusers' load_lora_weights, "
            "ComfyUI or A1111"
        )
    _read_tensors(network.source)  # a broken file is refused as broken first
    if network.variant == OFT_V2_MODULE:
        raise AdapterFormatError(
            f"{network.source}: a kohya OFTv2 network (networks.oft_v2, {len(network.shapes)} modules) rotates "
            "with a truncated Neumann series of the Cayley transform (I + 2Q + 2Q^2 + 2Q^3 + Q^4, "
            "use_cayley_neumann, always on in sd-scripts), which is not orthogonal and equals no exact Cayley "
            "rotation, so it cannot be loaded exactly; train with networks.boft (boft_n_butterfly_factor=1 "
            "is block-diagonal OFT) or merge it with sd-scripts"
        )
    if network.variant == "networks.oft":
        _check_oft_layout(network)
    raise AdapterFormatError(
        f"{network.source}: a kohya OFT network ({network.variant}, {len(network.shapes)} modules) rotates each "
        "layer's outputs, W' = blockdiag(R)^T W; BOFT here (and in PEFT) rotates its inputs, W' = (W M^T) * s, "
        "and no input rotation equals an output rotation for every weight, so it cannot be loaded exactly. "
        "Merge it into the base model with sd-scripts instead"
    )


# --- networks.boft -------------------------------------------------------------------------------
BOFT_LEAVES = ("boft_R", "boft_s")
"""The tensors ``networks.boft`` saves per module (``BOFTNetwork.PARAM_NAMES``)."""

KOHYA_DIGEST = "boft_diffusion.kohya_sha256"
"""Adapter metadata: digest of the kohya tensors read; a writer giving the same tensors keeps the
file's ``sshs_*`` hashes (they hash those tensors), any other drops them."""
KOHYA_DTYPE = "boft_diffusion.kohya_dtype"
"""Adapter metadata: the dtype of the kohya file read (``float32``, ``float16``, ``bfloat16``), the
default dtype written back."""

_BOFT_ROOTS = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_SDXL_UNET_NAMES = ("input_blocks_", "middle_block_", "output_blocks_")

# Every attribute name with a "_" on the way to a layer networks.boft adapts (diffusers' UNet2DConditionModel
# and transformers' CLIP), so that a kohya name splits back into its path: "lora_unet_down_blocks_0_..."
# -> "down_blocks.0....". Single words need no entry (a segment without "_" is taken as is).
_COMPOUND_NAMES = frozenset(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_in", "proj_out", "conv_shortcut",
        "time_emb_proj", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    }
)  # fmt: skip
_COMPOUND_WORDS = max(len(n.split("_")) for n in _COMPOUND_NAMES)


def _split_path(rest: str) -> str | None:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` (``None`` for an
    empty segment). A compound attribute this module does not know splits wrongly, and loading then
    refuses the file naming the layer the pipeline lacks."""
    words = rest.split("_")
    if not all(words):
        return None
    parts, position = [], 0
    while position < len(words):  # longest known compound first; any single word is an attribute
        size = next(
            n
            for n in range(min(_COMPOUND_WORDS, len(words) - position), 0, -1)
            if n == 1 or "_".join(words[position : position + n]) in _COMPOUND_NAMES
        )
        parts.append("_".join(words[position : position + size]))
        position += size
    return ".".join(parts)


@functools.cache
def _has_text_root(component: str) -> bool:
    """Whether the installed transformers' CLIP class of ``component`` (``CLIPTextModel`` for
    ``text_encoder``, ``CLIPTextModelWithProjection`` for ``text_encoder_2``) nests its layers under
    ``text_model``; from a one-layer model of width 8 built once."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=4, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        max_position_embeddings=4, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    model_class = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    return "text_model" in dict(model_class(config).named_children())


def kohya_module_name(component: str, path: str, sdxl: bool = False) -> str:
    """The name ``networks.boft`` gives the layer ``path`` of ``component`` (``native_prefix``):
    ``("unet", "down_blocks.0.attentions.0.proj_in")`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``;
    the text encoder is ``lora_te`` (one encoder) or ``lora_te1`` / ``lora_te2`` (``sdxl``), its layers
    under ``text_model.`` as in sd-scripts' transformers 4 (added where ``path`` lacks it)."""
    roots = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1" if sdxl else "lora_te",
        "text_encoder_2": "lora_te2",
    }
    if component not in roots or (component == "text_encoder_2" and not sdxl):
        raise ValueError(f"networks.boft has no module names for component {component!r}")
    return f"{roots[component]}.{_sd_scripts_path(component, path)}".replace(".", "_")


def _read_tensors(source: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(source, framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{source}: not a readable safetensors file ({err})") from err
    check_finite(tensors, source)
    return tensors


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and bytes of ``tensors``."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _boft_module_path(name: str, source: str) -> tuple[str, str]:
    """``lora_unet_down_blocks_0_...`` -> ``("unet", "down_blocks.0...")``; refuses what cannot map."""
    prefix = next((p for p in sorted(_BOFT_ROOTS, key=len, reverse=True) if name.startswith(p)), None)
    if prefix is None:
        raise AdapterFormatError(
            f"{source}: module {name} has a prefix networks.boft does not write (lora_unet_, lora_te_, "
            "lora_te1_, lora_te2_)"
        )
    rest = name[len(prefix) :]
    if prefix == "lora_unet_" and rest.startswith(_SDXL_UNET_NAMES):
        raise AdapterFormatError(
            f"{source}: module {name} is named in sd-scripts' SDXL UNet layout (input_blocks / middle_block / "
            "output_blocks); mapping it to diffusers' down_blocks / mid_block / up_blocks needs the UNet's "
            "block structure and is not implemented here (text encoder modules lora_te1_ / lora_te2_ map)"
        )
    path = _split_path(rest)
    if path is None:
        raise AdapterFormatError(f"{source}: module name {name} does not split into a layer path")
    component = _BOFT_ROOTS[prefix]
    if component != "unet" and path.startswith(_TEXT_ROOT) and not _has_text_root(component):
        path = path.removeprefix(_TEXT_ROOT)
    return component, path


def _boft_modules(network: KohyaNetwork) -> dict[str, dict[str, str]]:
    """``{component: {layer path: kohya module name}}`` of a ``networks.boft`` file, each module's tensors
    checked to be ``boft_R (factors, blocks, b, b)`` and ``boft_s (out, 1)``."""
    source = network.source
    prefixes = {p for name in network.shapes for p in _BOFT_ROOTS if name.startswith(p)}
    if "lora_te_" in prefixes and prefixes & {"lora_te1_", "lora_te2_"}:
        raise AdapterFormatError(
            f"{source}: holds both lora_te_ (one text encoder) and lora_te1_/lora_te2_ (SDXL) modules"
        )
    per_component: dict[str, dict[str, str]] = {}
    for name, leaves in network.shapes.items():
        if set(leaves) != set(BOFT_LEAVES):
            raise AdapterFormatError(
                f"{source}: module {name} holds {sorted(leaves)}; networks.boft saves boft_R and boft_s per module"
            )
        generator, scale = leaves["boft_R"], leaves["boft_s"]
        if len(generator) != 4 or generator[2] != generator[3] or len(scale) != 2 or 1 not in scale:
            raise AdapterFormatError(
                f"{source}: module {name} holds boft_R {generator} and boft_s {scale}; networks.boft stores "
                "boft_R (factors, blocks, b, b) and boft_s (out, 1)"
            )
        component, path = _boft_module_path(name, source)
        per_component.setdefault(component, {})[path] = name
    return per_component


def _read_boft(network: KohyaNetwork) -> AdapterFile:
    """A ``networks.boft`` file -> :class:`AdapterFile` (PEFT's layout under kohya names; module docstring).

    Its ``ss_network_*`` metadata is parsed as sd-scripts' ``create_network`` parses it
    (:func:`network_args_of`: a value sd-scripts could not parse is refused), the dropout taken from it, and
    a warning names a layer those arguments would not rebuild."""
    source = network.source
    per_component = _boft_modules(network)
    args = network_args_of(network.metadata, source)
    if "ss_network_args" in network.metadata:
        layers = [
            _Layer(component, path, *network.shapes[name]["boft_R"][:3])
            for component, paths in per_component.items()
            for path, name in paths.items()
        ]
        problems = _rebuild_problems(args, layers)
        if problems:
            _warn_not_rebuilt(
                f"{source}: its ss_network_args", problems, "write_kohya_adapter records arguments that do"
            )
    tensors = _read_tensors(source)
    dtypes = {t.dtype for t in tensors.values()}
    out_tensors, configs = {}, {}
    for component, paths in per_component.items():
        local = {
            f"{path}.{leaf}": tensors[f"{name}.{leaf}"]
            for path, name in paths.items()
            for leaf in BOFT_LEAVES
        }
        factors = {tensors[f"{name}.boft_R"].shape[0] for name in paths.values()}
        raw = {"boft_n_butterfly_factor": min(factors), "boft_dropout": args.dropout or 0.0}
        configs[component], out_tensors[component] = _convert_from_peft(raw, local, Path(source))
    metadata = {
        **network.metadata,
        "imported_from": f"kohya {BOFT_MODULE}",
        KOHYA_DIGEST: _digest(tensors),
        **({KOHYA_DTYPE: str(dtypes.pop()).removeprefix("torch.")} if len(dtypes) == 1 else {}),
    }
    return AdapterFile(out_tensors, configs, "default", metadata, source)


def _is_sdxl(adapter: AdapterFile, sdxl: bool | None, pipe: Any) -> bool:
    """SDXL naming: ``sdxl`` if given, else ``pipe``'s family, else the adapter's components / metadata."""
    if sdxl is not None:
        return sdxl
    if pipe is not None:
        return family_of(pipe).name == "sdxl"
    return (
        "text_encoder_2" in adapter.configs
        or adapter.metadata.get("family") == "sdxl"
        or str(adapter.metadata.get("ss_base_model_version", "")).startswith("sdxl")
    )


def _check_kohya_target(component: str, path: str, sdxl: bool) -> None:
    """Refuse a layer ``networks.boft`` would not create when loading (``_create_modules``): sd-scripts
    would skip its tensors ("ignored ... keys"), so the file would not give the same model."""
    if component == "unet":
        if sdxl:
            raise ValueError(
                f"unet.{path}: sd-scripts names SDXL UNet layers in the original layout (input_blocks / "
                "middle_block / output_blocks); writing them is not implemented (text encoders are)"
            )
        blocks = path.startswith(("down_blocks.", "up_blocks.", "mid_block."))
        kinds = (".attentions.", ".resnets.", ".downsamplers.", ".upsamplers.")
        if blocks and any(kind in f".{path}" for kind in kinds):
            return
        where = "Transformer2DModel, ResnetBlock2D, Downsample2D or Upsample2D"
    else:
        if ".self_attn." in f".{path}" or ".mlp." in f".{path}":
            return
        where = "CLIPAttention or CLIPMLP"
    raise ValueError(
        f"{component}.{path}: networks.boft adapts only layers inside {where} blocks; "
        "sd-scripts would ignore this layer's weights"
    )


def _valid_for_sd_scripts(path: str, factors: int, blocks: int, block_size: int) -> None:
    """``networks/boft.py`` ``_valid_boft_shape``: what its loader accepts for ``boft_R (m, r, b, b)``."""
    if factors > 1 and (blocks % 2 ** (factors - 1) or block_size % 2 or blocks % 2):
        raise ValueError(
            f"{path}: {factors} butterfly factors of {blocks} blocks of size {block_size}; sd-scripts needs "
            f"an even block size and a block count divisible by 2**(factors-1) and by 2"
        )


def write_kohya_adapter(
    adapter: AdapterFile,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    sdxl: bool | None = None,
    pipe: Any = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``adapter`` as a kohya sd-scripts ``networks.boft`` file (``--network_module networks.boft
    --network_weights <file>`` loads it; its ``merge_to`` gives the weights this project merges).

    Keys ``lora_unet_<path>.boft_R`` / ``.boft_s`` (``lora_te_`` for one text encoder, ``lora_te1_`` /
    ``lora_te2_`` for SDXL: ``sdxl=None`` infers it from ``pipe``'s family if given, else from the
    components and metadata: a second text encoder, ``family``, ``ss_base_model_version``; pass ``sdxl`` or
    ``pipe`` for an SDXL adapter without a second text encoder), ``boft_R`` as full
    skew matrices ``(m, r, b, b)`` and ``boft_s`` ``(out, 1)``. Metadata (:func:`_kohya_metadata`): the
    ``ss_*`` / ``modelspec.*`` metadata the adapter holds (the ``sshs_*`` hashes only if the tensors are those
    read), ``ss_network_module`` = ``networks.boft``, ``ss_network_args`` holding every argument of
    :data:`~boft_diffusion.io.kohya_args.NETWORK_ARGS` so that sd-scripts' ``create_network`` rebuilds
    exactly these layers with these layouts (a warning names what no arguments can express, e.g.
    components with different factor counts),
    ``ss_network_dim`` when none is recorded, then ``metadata``. ``dtype`` (default: the dtype of the kohya
    file it was read from, else float32) is sd-scripts' ``--save_precision``.

    Refused (``ValueError`` / :class:`AdapterFormatError`, nothing written): an existing ``path`` unless
    ``overwrite``; components other than unet / text_encoder / text_encoder_2; trained biases or
    ``modules_to_save`` (``networks.boft`` has none); layers sd-scripts would not adapt; layouts its loader
    rejects; an SDXL UNet (original-layout names not implemented). The file is written atomically.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: sd-scripts reads network weights from a .safetensors file; name it so")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace it")
    is_sdxl = _is_sdxl(adapter, sdxl, pipe)
    if dtype is None:
        dtype = getattr(torch, adapter.metadata.get(KOHYA_DTYPE, "float32"), torch.float32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: a floating-point torch.dtype is needed")
    out: dict[str, torch.Tensor] = {}
    layers: list[_Layer] = []
    dropouts = set()
    for component, config in adapter.configs.items():
        if component not in ("unet", "text_encoder", "text_encoder_2"):
            raise ValueError(f"{adapter.source}: component {component!r} has no networks.boft equivalent")
        for key, tensor in adapter.tensors.get(component, {}).items():
            module, _, leaf = key.rpartition(".")
            if leaf not in BOFT_LEAVES:
                raise ValueError(
                    f"{adapter.source}: {component}.{key} is not a BOFT generator or scale; networks.boft "
                    "saves neither trained biases nor modules_to_save weights"
                )
            _check_kohya_target(component, module, is_sdxl)
            name = kohya_module_name(component, module, is_sdxl)
            if leaf == "boft_s":
                out[f"{name}.boft_s"] = tensor.detach().float().reshape(-1, 1)
                continue
            factors, blocks, free = tensor.shape
            block_size = block_size_of(free)
            if not block_size:
                raise ValueError(f"{adapter.source}: {component}.{key} has {free} entries, no block size")
            _valid_for_sd_scripts(f"{component}.{module}", factors, blocks, block_size)
            out[f"{name}.boft_R"] = unpack_skew(tensor.detach().float(), block_size)
            layers.append(_Layer(component, module, factors, blocks, block_size))
            dropouts.add(config.boft_dropout)
        missing = [k for k in out if k.endswith(".boft_R") and k.replace(".boft_R", ".boft_s") not in out]
        if missing:
            raise ValueError(f"{adapter.source}: {missing[0]} has no boft_s beside it")
    if not out:
        raise ValueError(f"{adapter.source}: the adapter holds no BOFT tensors to write")
    out = {k: v.to(dtype).contiguous() for k, v in out.items()}
    info = _kohya_metadata(adapter, out, layers, dropouts, pipe if is_sdxl else None, is_sdxl, path)
    info.update(metadata or {})
    with atomic_file(path, replace=overwrite) as tmp:
        save_file(out, tmp, metadata=info)
    return path


def _kohya_metadata(
    adapter: AdapterFile,
    out: Mapping[str, torch.Tensor],
    layers: list[_Layer],
    dropouts: set[float],
    pipe: Any,
    sdxl: bool,
    path: Path,
) -> dict[str, str]:
    """The file's metadata. ``ss_network_args``: the adapter's own when it is the file read, unchanged
    (same tensors), and they rebuild every layer; else :func:`_recorded_network_args`, with a warning naming
    what they cannot express (:func:`_rebuild_problems`, different dropouts, SDXL encoder names)."""
    same_tensors = adapter.metadata.get(KOHYA_DIGEST) == _digest(out)
    info = {
        k: v
        for k, v in adapter.metadata.items()
        if k.startswith(("ss_", "modelspec.")) or (k.startswith("sshs_") and same_tensors)
    }
    info["ss_network_module"] = BOFT_MODULE
    if same_tensors and "ss_network_args" in info and not _rebuild_problems(network_args_of(info), layers):
        return info
    args = _recorded_network_args(layers, set(dropouts))
    info["ss_network_args"] = json.dumps(args)
    info.pop("ss_network_dropout", None)  # --network_dropout would override the recorded boft_dropout
    info.setdefault("ss_network_dim", str(int(args["boft_block_size"]) or args["boft_block_num"]))
    problems = _rebuild_problems(network_args_of(info, str(path)), layers)
    if len(dropouts) > 1:
        problems.append(f"the components train with dropouts {sorted(dropouts)}; create_network takes one")
    if sdxl:
        problems += _shared_name_problems(layers, pipe)
    if problems:
        _warn_not_rebuilt(f"{path}: the arguments recorded", problems, "no one set of --network_args can")
    return info
