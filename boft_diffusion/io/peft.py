"""PEFT interop: a pure translation between a PEFT BOFT adapter folder and an :class:`AdapterFile`.

:func:`read_peft_adapter` reads one, :func:`write_peft_adapter` writes one that PEFT's
``PeftModel.from_pretrained`` loads. Neither touches a pipeline: writing takes the adapter's plans
(:func:`~boft_diffusion.inject.plan_adapter`: block sizes, layer types, model classes).

PEFT layout: a folder with ``adapter_config.json`` (``peft_type: BOFT``) and
``adapter_model.safetensors`` for one model, or ``unet/`` and ``text_encoder/`` sub-folders as
PEFT's DreamBooth example writes. PEFT keys are ``base_model.model.<module path>.boft_R`` /
``.boft_s`` (plus ``<path>.base_layer.bias`` for ``bias="boft_only"`` and ``<module>.<param>`` for
``modules_to_save``). PEFT stores each generator as a full ``b × b`` matrix ``A`` (it uses
``Q = (A - A^T)/2``) and ``boft_s`` as ``(out, 1)`` (Linear) or ``(1, out)`` (Conv2d); here generators are
packed (:func:`~boft_diffusion.functional.pack_skew`, exact: only ``Q`` matters) and ``boft_s`` is ``(out,)``.

What the tensors hold decides (PEFT without its CUDA extension silently trains one butterfly factor,
whatever its config says). Anything this project cannot represent is refused with the reason before
a pipeline is touched: another PEFT method, tensors of unknown kind, layers that share neither a block
size nor a block number, a ``.bin`` (pickle) file, a non-finite (NaN or infinite) tensor.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..atomic import atomic_write_text, staged_dir
from ..config import BOFTConfig
from ..functional import num_free_entries, pack_skew, unpack_skew
from ..inject import AdapterPlan, TargetPlan
from ..layers import BOFTConv2d
from .format import AdapterFile, AdapterFormatError, atomic_save_safetensors, check_finite

__all__ = ["is_peft_adapter", "read_peft_adapter", "write_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_BASE = "base_layer"  # PEFT's own wrapper attribute: its file layout keeps an adapted layer's bias there
_COMPONENT_DIRS = ("unet", "text_encoder", "text_encoder_2", "controlnet")
_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def _peft_folders(path: Path) -> dict[str, Path]:
    """``{component: folder}`` of a PEFT adapter at ``path`` (empty if it is not one)."""
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        path = path.parent
    if (path / CONFIG_NAME).is_file():
        return {_component_of(path): path}
    return {c: path / c for c in _COMPONENT_DIRS if (path / c / CONFIG_NAME).is_file()}


def _component_of(folder: Path) -> str:
    """Which pipeline component a single-model PEFT adapter belongs to.

    PEFT records the base model class (``auto_mapping``); without it, CLIP module names
    (``q_proj``) mean the text encoder, anything else the UNet.
    """
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return "unet"  # _read_config reports the broken file
    base_class = ((raw.get("auto_mapping") or {}) if isinstance(raw, dict) else {}).get("base_model_class")
    if base_class:
        return "text_encoder" if base_class in _TEXT_ENCODER_CLASSES else "unet"
    targets = raw.get("target_modules") if isinstance(raw, dict) else None
    names = [targets] if isinstance(targets, str) else list(targets or [])
    return "text_encoder" if any("q_proj" in t or "out_proj" in t for t in names) else "unet"


def is_peft_adapter(path: str | os.PathLike) -> bool:
    """True for a PEFT adapter folder (or its ``adapter_config.json`` / ``adapter_model.safetensors``)."""
    return bool(_peft_folders(Path(path)))


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_NAME
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{file}: not a readable adapter config ({err})") from err
    except RecursionError:
        raise AdapterFormatError(f"{file}: not a readable adapter config (JSON nested too deeply)") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{file}: not a PEFT adapter config (a JSON object is expected)")
    if raw.get("peft_type") != "BOFT":
        raise AdapterFormatError(
            f"{file}: a PEFT {raw.get('peft_type')} adapter, not BOFT; only BOFT adapters load here"
        )
    return raw


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        others = sorted(p.name for p in folder.glob("adapter_model.*"))
        raise AdapterFormatError(
            f"{folder}: no {WEIGHTS_NAME}{f' (found {others})' if others else ''}; "
            "only safetensors PEFT adapters load (pickle files are not read)"
        )
    try:
        with safe_open(file, framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{file}: not a readable safetensors file ({err})") from err
    check_finite(tensors, str(file))
    return {k.removeprefix(_PREFIX): t for k, t in tensors.items()}


def _layout_config(generators: dict[str, torch.Tensor], src: Path) -> dict[str, int]:
    """``boft_block_size`` or ``boft_block_num`` (whichever all layers share) and the factor count."""
    for key, tensor in generators.items():
        if tensor.ndim != 4 or tensor.shape[-1] != tensor.shape[-2]:
            raise AdapterFormatError(
                f"{src}: {key}.boft_R has shape {tuple(tensor.shape)}; PEFT BOFT stores (factors, blocks, b, b)"
            )
    factors = {t.shape[0] for t in generators.values()}
    if len(factors) != 1:
        raise AdapterFormatError(f"{src}: layers hold different butterfly factor counts {sorted(factors)}")
    sizes = {t.shape[-1] for t in generators.values()}
    counts = {t.shape[1] for t in generators.values()}
    if len(sizes) == 1:
        return {"boft_block_size": sizes.pop(), "boft_block_num": 0, "boft_n_butterfly_factor": factors.pop()}
    if len(counts) == 1:
        return {
            "boft_block_size": 0,
            "boft_block_num": counts.pop(),
            "boft_n_butterfly_factor": factors.pop(),
        }
    raise AdapterFormatError(
        f"{src}: layers share neither a block size ({sorted(sizes)}) nor a block number ({sorted(counts)}); "
        "one BOFTConfig per component cannot describe that"
    )


def _convert_from_peft(
    raw: dict[str, Any], tensors: dict[str, torch.Tensor], src: Path
) -> tuple[BOFTConfig, dict[str, torch.Tensor]]:
    """PEFT tensors -> this project's keys and shapes; the config targets exactly the adapted modules."""
    generators = {k.removesuffix(".boft_R"): t for k, t in tensors.items() if k.endswith(".boft_R")}
    if not generators:
        raise AdapterFormatError(f"{src}: no boft_R tensors (is this a BOFT adapter?)")
    layout = _layout_config(generators, src)
    if layout["boft_n_butterfly_factor"] != raw.get("boft_n_butterfly_factor", 1):
        # PEFT without its CUDA extension silently trains with one factor; the tensors say what ran.
        warnings.warn(
            f"{src}: config says boft_n_butterfly_factor={raw.get('boft_n_butterfly_factor')}, "
            f"the weights hold {layout['boft_n_butterfly_factor']} factor(s); loading what the weights hold",
            stacklevel=4,
        )
    saved = raw.get("modules_to_save") or []
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        path, _, leaf = key.rpartition(".")
        if leaf == "boft_R":
            out[key] = pack_skew(tensor.float())
        elif leaf == "boft_s":
            if path not in generators:
                raise AdapterFormatError(f"{src}: {key} has no boft_R beside it")
            out[key] = tensor.float().flatten()
        elif leaf == "bias" or any(key.startswith(m + ".") or f".{m}." in key for m in saved):
            out[key.replace(f".{_PEFT_BASE}.", ".")] = tensor
        else:
            raise AdapterFormatError(
                f"{src}: tensor {key!r} is not a BOFT generator, scale, bias or modules_to_save weight; "
                "this adapter cannot be represented here"
            )
    try:
        config = BOFTConfig(
            **layout,
            target_modules=sorted(generators),
            boft_dropout=raw.get("boft_dropout", 0.0),
            bias=raw.get("bias", "none"),
            modules_to_save=saved or None,
        )
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"{src}: unsupported PEFT BOFT config ({err})") from err
    return config, out


def read_peft_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read a PEFT BOFT adapter folder (one model, or the DreamBooth ``unet/`` + ``text_encoder/`` layout).

    Every component is read and converted before anything is returned, so a bad one refuses the whole.
    """
    path = Path(path)
    folders = _peft_folders(path)
    if not folders:
        raise AdapterFormatError(f"{path}: no {CONFIG_NAME} here or in {_COMPONENT_DIRS} sub-folders")
    tensors, configs = {}, {}
    for comp, folder in folders.items():
        configs[comp], tensors[comp] = _convert_from_peft(_read_config(folder), _read_tensors(folder), folder)
    root = path.parent if path.is_file() else path
    return AdapterFile(tensors, configs, "default", {"imported_from": "peft"}, str(root))


# --- export --------------------------------------------------------------------------------------
def _to_peft_tensors(tensors: Mapping[str, torch.Tensor], targets: Mapping[str, TargetPlan]) -> dict:
    """This project's tensors of one component -> PEFT keys and shapes (inverse of the import)."""
    out = {}
    for key, tensor in tensors.items():
        path, _, leaf = key.rpartition(".")
        target = targets.get(path)
        if target is None:  # modules_to_save weights and un-adapted biases keep their keys
            out[_PREFIX + key] = tensor
        elif leaf == "boft_R":
            block_size = target.layout.block_size
            if tensor.shape[-1] != num_free_entries(block_size):
                raise ValueError(f"{key}: {tensor.shape[-1]} free entries do not fit block size {block_size}")
            out[_PREFIX + key] = unpack_skew(tensor.float(), block_size)
        elif leaf == "boft_s":
            conv = issubclass(target.layer_type, BOFTConv2d)
            out[_PREFIX + key] = tensor.reshape(1, -1) if conv else tensor.reshape(-1, 1)
        else:  # a trained bias of an adapted layer
            out[f"{_PREFIX}{path}.{_PEFT_BASE}.{leaf}"] = tensor
    return out


def _peft_config(
    config: BOFTConfig, tensors: Mapping[str, torch.Tensor], model_type: type[nn.Module]
) -> dict:
    return {
        **config.to_dict(),
        "target_modules": sorted(k.removesuffix(".boft_R") for k in tensors if k.endswith(".boft_R")),
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "peft_type": "BOFT",
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        "auto_mapping": {"base_model_class": model_type.__name__, "parent_library": model_type.__module__},
    }


def write_peft_adapter(
    adapter: AdapterFile, save_directory: str | os.PathLike, plans: Mapping[str, AdapterPlan]
) -> Path:
    """Write ``adapter`` in PEFT's layout: ``<dir>/<component>/adapter_{config.json,model.safetensors}``.

    ``plans``: each component's :class:`~boft_diffusion.inject.AdapterPlan` of the adapter (block sizes,
    layer types, model class). Component folders must not exist yet; each is filled under a temporary
    name and renamed, so an error leaves none half-written. Returns ``<dir>``.
    """
    root = Path(save_directory)
    existing = [str(root / c) for c in adapter.configs if (root / c).exists()]
    if existing:
        raise FileExistsError(f"{existing[0]}: already exists; choose a new output folder")
    converted = {
        comp: _to_peft_tensors(adapter.tensors[comp], plans[comp].targets) for comp in adapter.configs
    }
    for comp, config in adapter.configs.items():
        peft_config = _peft_config(config, adapter.tensors[comp], plans[comp].model_type)
        with staged_dir(root / comp) as staging:
            atomic_save_safetensors(converted[comp], staging / WEIGHTS_NAME, {"format": "pt"})
            atomic_write_text(staging / CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True))
    return root
