"""Merged checkpoints: a stock diffusers folder, or one ``.safetensors`` file in the original SD layout.

``export_merged`` folds the active BOFT adapters (with their strengths) into the weights and writes a
checkpoint that opens with no project code:

- ``format="diffusers"``: ``StableDiffusionPipeline.from_pretrained(out_dir)`` (safetensors; with
  ``dtype`` the weights are cast, with ``variant`` the files are named ``*.<variant>.safetensors``).
- ``format="single_file"``: one file with the original Stable Diffusion keys (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``) that ComfyUI, AUTOMATIC1111 and
  ``StableDiffusionPipeline.from_single_file(path, config=<diffusers folder of the base>)`` read.

The caller's pipeline is never modified (nor its modules' train/eval mode): merged weights
``W' = (W M^T) ⊙ s`` and biases are computed per layer into new tensors, deterministically (dropout is
training-only), and every other tensor is shared, not copied. A non-finite merged tensor is refused. Provenance (base model, adapters and
strengths) goes into the safetensors metadata and, for folders, ``boft_provenance.json``. Output is
written beside ``out_dir`` under a temporary name and renamed into place: an error leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .inject import ModulesToSave, boft_layers
from .layers import BOFTLayer
from .pipeline import _components

__all__ = [
    "PROVENANCE_NAME",
    "SINGLE_FILE_NAME",
    "export_merged",
    "merged_state_dict",
    "parse_dtype",
    "provenance",
    "to_original_layout",
]

PROVENANCE_NAME = "boft_provenance.json"
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


# --- merged weights, computed without touching the pipeline ---------------------------------------
@torch.no_grad()
def _merged_tensors(path: str, layer: BOFTLayer, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``{"<path>.weight": W', "<path>.bias": b'}`` of a layer's pending adapters, in the stock dtype.

    Empty when nothing is pending (the base tensors already are the answer). Raises ``ValueError``
    naming the tensor if a merged value is not finite.
    """
    pending = layer.pending_adapters()
    if not pending:
        return {}
    base = layer.base_layer
    out = {f"{path}.weight": layer.merged_weight().to(dtype or base.weight.dtype)}
    if base.bias is not None and any(name in layer.boft_bias for name in pending):
        out[f"{path}.bias"] = layer.merged_bias().to(dtype or base.bias.dtype)
    for key, tensor in out.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(
                f"Non-finite values in the merged tensor {key!r}: adapter(s) {pending} look broken; "
                "nothing was exported"
            )
    return out


def _stock_key(key: str, layers: Mapping[str, BOFTLayer], saved: Mapping[str, ModulesToSave]) -> str | None:
    """The stock module's key for a state-dict key of an adapted module (``None``: not part of it)."""
    prefix, _, _ = key.rpartition(".")
    path, _, leaf = prefix.rpartition(".")
    if leaf in ("boft_R", "boft_s", "boft_bias") and path in layers:
        return None
    for name, wrapper in saved.items():
        if not key.startswith(name + "."):
            continue
        rest = key[len(name) + 1 :]
        active = wrapper.active if not wrapper.disabled and wrapper.active in wrapper.copies else None
        keep = "original." if active is None else f"copies.{active}."
        return f"{name}.{rest[len(keep) :]}" if rest.startswith(keep) else None
    return key.replace(".base_layer.", ".")


@torch.no_grad()
def merged_state_dict(module: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``module``'s state dict as the stock (un-adapted) module has it, with active adapters merged.

    BOFT parameters are dropped, ``.base_layer`` leaves the keys, adapted weights become
    ``W' = (W M^T) ⊙ s`` and adapted biases ``b + w (b_a - b)`` (new tensors, computed deterministically
    whatever the module's train/eval mode), ``modules_to_save`` give their active copy. Every other tensor
    is the module's own (shared, not copied) unless ``dtype`` casts floating tensors. A non-finite merged
    tensor raises ``ValueError``.
    """
    layers = boft_layers(module)
    saved = {n: m for n, m in module.named_modules() if isinstance(m, ModulesToSave)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in module.state_dict().items():
        stock = _stock_key(key, layers, saved)
        if stock is not None:
            state[stock] = tensor
    for path, layer in layers.items():
        state.update(_merged_tensors(path, layer, dtype))
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    return state


def _stock_module(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh module of ``module``'s class (built on the meta device) holding exactly ``state``."""
    from accelerate import init_empty_weights
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    with init_empty_weights():
        if isinstance(module, ModelMixin):
            fresh = type(module).from_config(module.config)
        elif isinstance(module, PreTrainedModel):
            fresh = type(module)(module.config)
        else:
            raise TypeError(f"Cannot export a {type(module).__name__}: not a diffusers or transformers model")
    fresh.load_state_dict(state, strict=True, assign=True)
    return fresh.eval()


# --- provenance ----------------------------------------------------------------------------------
def _active_adapters(pipe: Any) -> list[dict[str, Any]]:
    """``[{"name", "strength", "components"}]`` of the adapters in effect (active or already merged)."""
    found: dict[str, dict[str, Any]] = {}
    for comp, module in _components(pipe).items():
        for layer in boft_layers(module).values():
            if layer.disabled:
                continue
            for name in dict.fromkeys([*layer.merged_adapters, *layer.active_adapters]):
                entry = found.setdefault(
                    name, {"name": name, "strength": layer.strength[name], "components": []}
                )
                if comp not in entry["components"]:
                    entry["components"].append(comp)
    return list(found.values())


def provenance(pipe: Any, base_model: str | None = None, **extra: Any) -> dict[str, Any]:
    """What the export holds: base model, adapters with strengths, the tool that wrote it."""
    from . import __version__

    base = (
        base_model
        or getattr(pipe, "name_or_path", None)
        or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    )
    return {
        "base_model": str(base) if base else None,
        "adapters": _active_adapters(pipe),
        "merged_by": f"boft_diffusion {__version__}",
        **extra,
    }


def _metadata(prov: Mapping[str, Any]) -> dict[str, str]:
    """Safetensors metadata (string values): a few flat keys plus the full JSON."""
    adapters = prov.get("adapters", [])
    return {
        "boft_diffusion.provenance": json.dumps(prov, sort_keys=True),
        "boft_diffusion.base_model": str(prov.get("base_model")),
        "boft_diffusion.adapters": ",".join(f"{a['name']}:{a['strength']:g}" for a in adapters),
    }


def _add_safetensors_metadata(path: Path, extra: Mapping[str, str]) -> None:
    """Add metadata to a safetensors file by rewriting its header (tensor bytes are streamed unchanged)."""
    with open(path, "rb") as src:
        (size,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(size))
        header["__metadata__"] = {**(header.get("__metadata__") or {}), **extra}
        data = json.dumps(header, separators=(",", ":")).encode()
        data += b" " * (-len(data) % 8)  # keep the data section 8-byte aligned
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(data)) + data)
            shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, path)


# --- staging: nothing partial is ever left at the destination -----------------------------------
@contextlib.contextmanager
def _staged(out: Path, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; rename it to ``out`` on success, delete it on error."""
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out}: output path already exists; choose a new one")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    target = tmp if is_dir else tmp / out.name
    try:
        yield target
        if out.exists():
            raise FileExistsError(f"{out}: output path appeared while exporting; the export is discarded")
        os.replace(target, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # parents this call made, innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    finally:
        if not is_dir:
            shutil.rmtree(tmp, ignore_errors=True)


# --- diffusers folder ----------------------------------------------------------------------------
def _merged_pipeline(pipe: Any, dtype: torch.dtype | None) -> Any:
    """A new pipeline of the same class: stock modules with merged weights, other components shared."""
    components = dict(pipe.components)
    for name, component in components.items():
        if isinstance(component, nn.Module):
            components[name] = _stock_module(component, merged_state_dict(component, dtype))
    params = inspect.signature(type(pipe).__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    kwargs.update({k: v for k, v in pipe.config.items() if k in params and k not in components})
    return type(pipe)(**kwargs)


def _export_diffusers(
    pipe: Any, folder: Path, dtype: torch.dtype | None, variant: str | None, prov: dict
) -> None:
    merged = _merged_pipeline(pipe, dtype)
    merged.save_pretrained(folder, safe_serialization=True, variant=variant)
    metadata = _metadata(prov)
    for comp in {c for a in prov["adapters"] for c in a["components"]}:
        for file in sorted((folder / comp).glob("*.safetensors")):
            _add_safetensors_metadata(file, metadata)
    (folder / PROVENANCE_NAME).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")


# --- original Stable Diffusion key layout ----------------------------------------------------------
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(key: str, per_block: int, up_has_attention: set[int]) -> str:
    """diffusers UNet2DConditionModel key -> LDM ``UNetModel`` key (inverse of diffusers' converter)."""
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        slot = 1 if kind == "attentions" else 2 * index
        return ".".join(["middle_block", str(slot), *_resnet_rest(kind, rest)])
    if parts[0] in ("down_blocks", "up_blocks"):
        block, kind = int(parts[1]), parts[2]
        down = parts[0] == "down_blocks"
        width = per_block + 1
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.* -> input_blocks.i.0.op.*
            return ".".join(["input_blocks", str(1 + block * width + per_block), "0.op", *parts[5:]])
        if kind == "upsamplers":  # up_blocks.b.upsamplers.0.conv.* -> output_blocks.i.{1|2}.conv.*
            slot = 2 if block in up_has_attention else 1
            return ".".join(["output_blocks", str(block * width + per_block), str(slot), *parts[4:]])
        layer, rest = int(parts[3]), parts[4:]
        index = 1 + block * width + layer if down else block * width + layer
        slot = "1" if kind == "attentions" else "0"
        return ".".join(
            ["input_blocks" if down else "output_blocks", str(index), slot, *_resnet_rest(kind, rest)]
        )
    raise KeyError(f"UNet key {key!r} has no place in the original Stable Diffusion layout")


def _resnet_rest(kind: str, rest: list[str]) -> list[str]:
    if kind != "resnets":
        return rest
    return [_UNET_RESNET.get(rest[0], rest[0]), *rest[1:]]


def _vae_key(key: str, num_up: int) -> str:
    """diffusers AutoencoderKL key -> LDM ``AutoencoderKL`` key."""
    for new, old in _VAE_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    parts = key.split(".")
    if len(parts) < 3 or parts[1] not in ("down_blocks", "up_blocks", "mid_block"):
        return key  # conv_in, conv_out, quant_conv, post_quant_conv
    side, kind = parts[0], parts[1]
    if kind == "mid_block":
        if parts[2] == "attentions":
            name = ".".join(parts[4:-1])
            return f"{side}.mid.attn_1.{_VAE_ATTENTION[name]}.{parts[-1]}"
        return ".".join([side, f"mid.block_{int(parts[3]) + 1}", *_vae_resnet(parts[4:])])
    block = int(parts[2]) if kind == "down_blocks" else num_up - 1 - int(parts[2])
    stage = "down" if kind == "down_blocks" else "up"
    if parts[3] in ("downsamplers", "upsamplers"):
        return ".".join(
            [side, stage, str(block), "downsample" if stage == "down" else "upsample", *parts[5:]]
        )
    return ".".join([side, stage, str(block), "block", parts[4], *_vae_resnet(parts[5:])])


def _vae_resnet(rest: list[str]) -> list[str]:
    return ["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]]


def to_original_layout(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Diffusers state dicts of an SD 1.x-style pipeline -> one original (CompVis/LDM) state dict.

    UNet keys get ``model.diffusion_model.``, VAE keys ``first_stage_model.`` (mid-block attention
    weights as 1x1 convolutions, as the original stores them), CLIP keys
    ``cond_stage_model.transformer.text_model.``. Exact inverse of diffusers' single-file converters.
    """
    per_block = unet_config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"single_file export needs one layers_per_block for all blocks, got {per_block}")
    up_attention = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.") and ".attentions." in k}
    out = {f"model.diffusion_model.{_unet_key(k, per_block, up_attention)}": t for k, t in unet.items()}
    num_up = len(vae_config["up_block_types"])
    for key, tensor in vae.items():
        new = _vae_key(key, num_up)
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[f"first_stage_model.{new}"] = tensor
    for key, tensor in text_encoder.items():
        out[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = tensor
    return out


def _export_single_file(pipe: Any, file: Path, dtype: torch.dtype | None, prov: dict) -> None:
    from safetensors.torch import save_file

    components = _components(pipe)
    extra = sorted(c for c in components if c not in ("unet", "text_encoder"))
    if extra or getattr(pipe, "vae", None) is None or "text_encoder" not in components:
        raise ValueError(
            "single_file export writes Stable Diffusion 1.x/2.x checkpoints (unet, vae, text_encoder); "
            f"this pipeline has {sorted(components)}{' with ' + str(extra) if extra else ''}: "
            "use format='diffusers'"
        )
    state = to_original_layout(
        merged_state_dict(pipe.unet, dtype),
        merged_state_dict(pipe.vae, dtype),
        merged_state_dict(pipe.text_encoder, dtype),
        pipe.unet.config,
        pipe.vae.config,
    )
    save_file(
        {k: t.contiguous() for k, t in state.items()}, file, metadata={"format": "pt", **_metadata(prov)}
    )


# --- entry point ---------------------------------------------------------------------------------
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
    ``.safetensors`` file; ``out_dir`` ending in ``.safetensors`` names the file itself, any other path is a
    new folder holding ``model.safetensors`` and ``boft_provenance.json``. ``dtype`` (``"fp16"``,
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
        with _staged(out, is_dir=True) as folder:
            _export_diffusers(pipe, folder, torch_dtype, variant, prov)
    elif out.suffix == ".safetensors":
        with _staged(out, is_dir=False) as file:
            _export_single_file(pipe, file, torch_dtype, prov)
    else:
        with _staged(out, is_dir=True) as folder:
            _export_single_file(pipe, folder / SINGLE_FILE_NAME, torch_dtype, prov)
            (folder / PROVENANCE_NAME).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return out
