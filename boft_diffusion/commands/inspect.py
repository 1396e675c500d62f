"""``boft-diffusion inspect``: which format a file is in, what it loads into, and for a BOFT adapter how
far it rotates each layer.

Any file or folder is first told apart (:func:`~boft_diffusion.io.detect_format`): this project's adapter,
a PEFT BOFT folder, a kohya OFT/BOFT network, a LoRA (diffusers / PEFT ``lora_A``/``lora_B`` or kohya
``lora_down``/``lora_up`` keys), a full-difference file (``.diff`` / ``.diff_b``), a merged single-file
checkpoint (``model.diffusion_model.*``) or a diffusers folder (``model_index.json``). Every report has a
``Format:`` line and a ``Target:`` line (the pipeline components its keys address, and what loads it). A
file that is not a BOFT adapter gets a short report (layers, LoRA ranks, parameters, file size) and is
never read by ``load_boft_weights``; an unknown or unreadable one is one ``error:`` line, exit code 2.

For a project adapter (file or folder) or a PEFT BOFT folder, never a pipeline, the full report: per component: targets,
butterfly layout, trainable parameters (the true count: ``b(b-1)/2`` free generator entries per block, plus
scales and any trained biases or modules); file size; and per layer:

- orthogonality error ``max |R R^T - I|`` of the float32 Cayley blocks the layers use (products taken in
  float64), the largest over all blocks;
- rotation angles: a block ``R = Cayley(Q)`` turns ``b/2`` planes by its principal angles
  ``θ_k = 2·atan(σ_k(Q))`` (``σ_k`` the singular values of the skew ``Q``; ``R``'s eigenvalues are
  ``e^{±iθ_k}``), reported as the largest and the mean over every block of every factor, in degrees.
  ``0°`` is the identity (an untrained adapter); ``180°`` is the Cayley transform's limit;
- the range of the output scale ``s``.

An adapter trained for controllable generation also says what its control is: a light encoder (its
widths and the size it works at) or a ControlNet (rebuilt from the UNet or loaded from where), and how
to sample with it.

A broken adapter is refused, not reported: a tensor holding NaN or inf, or ``boft_config`` metadata
that does not parse (malformed, wrongly typed, nested too deeply), is one ``error:`` line naming the
file (and the first non-finite tensor) with exit code 2, since its statistics would mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from . import Command, add_example, check_adapter_path, reports_input_errors

HELP = (
    "tell a file's format (BOFT, PEFT, kohya, LoRA, diff, checkpoint) and targets; for BOFT adapters "
    "their layout, size, orthogonality and rotation angles"
)
EXAMPLE = """examples:
  boft-diffusion inspect ./out/toy-boft
  boft-diffusion inspect ./peft-dreambooth-output --json > report.json
  boft-diffusion inspect ./some_lora.safetensors

Rotation angles are the principal angles 2*atan(sigma(Q)) of each orthogonal block, in degrees.
An adapter holding NaN or inf values is refused with one error line (exit code 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example(parser, EXAMPLE)
    parser.add_argument(
        "adapter",
        metavar="FILE",
        help="adapter, LoRA, difference or checkpoint file, or adapter / PEFT / diffusers folder",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def block_size_of(free_entries: int) -> int:
    """``b`` from the number of free generator entries ``b(b-1)/2`` per block."""
    b = round((1 + math.sqrt(1 + 8 * free_entries)) / 2)
    if b * (b - 1) // 2 != free_entries:
        raise ValueError(f"{free_entries} free entries per block match no block size")
    return b


def layer_stats(packed: Any, scale: Any) -> dict[str, Any]:
    """Statistics of one adapted layer from its packed generators ``(m, r, b(b-1)/2)`` and scale ``(out,)``."""
    import torch

    from ..functional import block_rotations, unpack_skew

    m, r, free = packed.shape
    b = block_size_of(free)
    sigma = torch.linalg.svdvals(unpack_skew(packed.double(), b)) if b > 1 else torch.zeros(m, r, 1)
    angles = torch.rad2deg(2 * torch.atan(sigma))
    blocks = block_rotations(packed, b).double()  # the float32 blocks the layers use
    error = (blocks @ blocks.transpose(-1, -2) - torch.eye(b, dtype=torch.float64)).abs().max()
    scale = scale.double()
    return {
        "dim": r * b,
        "out": int(scale.numel()),
        "block_size": b,
        "block_num": r,
        "factors": m,
        "angle_max_deg": float(angles.max()),
        "angle_mean_deg": float(angles.mean()),
        "scale_min": float(scale.min()),
        "scale_max": float(scale.max()),
        "orthogonality_error": float(error),
    }


def _target_kind(module_path: str) -> str:
    """``...attn1.to_q`` -> ``to_q``; ``...attn1.to_out.0`` -> ``to_out.0`` (a list index keeps its parent)."""
    parts = module_path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _size_on_disk(source: Path) -> int:
    if source.is_file():
        return source.stat().st_size
    return sum(
        p.stat().st_size for p in source.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
    )


def _layer_tensors(tensors: dict[str, Any], comp: str, source: str) -> dict[str, tuple[Any, Any]]:
    """``{layer: (packed generators, scale)}`` of one component, each shape checked (a file that
    reads may still hold tensors of no BOFT layout; its statistics would be meaningless)."""
    from ..io import AdapterFormatError

    layers = {}
    for key, packed in sorted(tensors.items()):
        name = key.removesuffix(".boft_R")
        if name == key or f"{name}.boft_s" not in tensors:
            continue
        scale = tensors[f"{name}.boft_s"]
        if packed.ndim != 3 or 0 in packed.shape[:2] or scale.numel() == 0 or not packed.is_floating_point():
            raise AdapterFormatError(
                f"{source}: {comp}.{key} is {packed.dtype} {tuple(packed.shape)} with a scale of shape "
                f"{tuple(scale.shape)}; expected float (factors, blocks, b(b-1)/2) and a non-empty scale"
            )
        try:
            block_size_of(packed.shape[-1])
        except ValueError as err:
            raise AdapterFormatError(f"{source}: {comp}.{key}: {err}") from None
        layers[name] = (packed, scale)
    return layers


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """The report of the file or folder at ``path`` (what ``inspect --json`` prints): its format first."""
    from ..io import detect_format

    detected = detect_format(path)
    if detected.kind in ("boft_diffusion", "peft_boft"):
        return boft_report(path)
    return other_report(Path(path), detected)


def boft_report(path: str | Path) -> dict[str, Any]:
    """The full report of a BOFT adapter (project file or folder, or PEFT BOFT folder)."""
    from ..io import is_peft_adapter, read_adapter, read_peft_adapter

    peft = is_peft_adapter(path)
    adapter = read_peft_adapter(path) if peft else read_adapter(path)
    control = _checked_control(adapter)
    components = {}
    for comp, config in adapter.configs.items():
        tensors = adapter.tensors[comp]
        layers = {
            name: layer_stats(packed, scale)
            for name, (packed, scale) in _layer_tensors(tensors, comp, adapter.source).items()
        }
        kinds = sorted({_target_kind(name) for name in layers})
        stored_R = sum(s["factors"] * s["block_num"] * s["block_size"] ** 2 for s in layers.values())
        packed_R = sum(t.numel() for k, t in tensors.items() if k.endswith(".boft_R"))
        trainable = sum(t.numel() for t in tensors.values())
        components[comp] = {
            "config": config.to_dict() | {"target_modules": kinds},
            "layers": len(layers),
            "trainable_parameters": trainable,
            "stored_parameters": trainable - packed_R + stored_R if peft else trainable,
            "per_layer": layers,
        }
    worst = max(
        (
            (s["orthogonality_error"], f"{c}.{n}")
            for c, v in components.items()
            for n, s in v["per_layer"].items()
        ),
        default=(0.0, None),
    )
    kind = "peft_boft" if peft else "boft_diffusion"
    return {
        "path": adapter.source,
        "kind": kind,
        "format": "peft" if peft else f"boft_diffusion v{adapter.metadata.get('format_version')}",
        "format_name": "PEFT BOFT adapter folder"
        if peft
        else f"boft_diffusion adapter v{adapter.metadata.get('format_version')}",
        "target": {
            "components": sorted(components),
            "family": adapter.metadata.get("family"),
            "loads_with": LOADS_WITH[kind],
        },
        "adapter_name": adapter.adapter_name,
        "file_size_bytes": _size_on_disk(Path(adapter.source)),
        "trainable_parameters": sum(c["trainable_parameters"] for c in components.values()),
        "max_orthogonality_error": worst[0],
        "max_orthogonality_error_layer": worst[1],
        "control": control,
        "trained_state": {
            kind: {key: list(t.shape) for key, t in tensors.items()}
            for kind, tensors in adapter.states.items()
        },
        "components": components,
    }


def _checked_control(adapter: Any) -> dict[str, Any] | None:
    """The adapter's control metadata, its claimed sizes checked against its own tensors (nothing built)."""
    from ..control import check_control_claims, control_metadata

    info = control_metadata(adapter.metadata, adapter.source)
    check_control_claims(adapter, info)
    return _reported(info)


LOADS_WITH = {
    "boft_diffusion": "boft_diffusion load_boft_weights / boft-diffusion sample, merge and export --adapter",
    "peft_boft": "boft_diffusion load_boft_weights, or PEFT's PeftModel.from_pretrained per component",
    "kohya_boft": "kohya sd-scripts (--network_module networks.boft), or boft_diffusion load_boft_weights",
    "kohya_oft": (
        "kohya sd-scripts or LyCORIS (whichever wrote it); this project's load_boft_weights does not read it: "
        "it rotates layer outputs (networks.oft, LyCORIS) or uses a Neumann series (networks.oft_v2)"
    ),
    "lora": "diffusers load_lora_weights / ComfyUI / A1111; this project's load_boft_weights does not read it",
    "diff": "diffusers load_lora_weights / ComfyUI / A1111; this project's load_boft_weights does not read it",
    "checkpoint": (
        "diffusers from_single_file / ComfyUI / A1111, as a base model (boft-diffusion --base takes it "
        "converted to a diffusers folder)"
    ),
    "diffusers": "DiffusionPipeline.from_pretrained / boft-diffusion --base",
}
"""Per format (:data:`~boft_diffusion.io.FILE_FORMATS`): what loads it."""

_FORMAT_NAMES = {
    "kohya_boft": "kohya BOFT network (networks.boft)",
    "kohya_oft": "kohya OFT network",
    "diff": "full-difference file (.diff / .diff_b keys)",
    "checkpoint": "merged single-file checkpoint (model.diffusion_model.*)",
    "diffusers": "diffusers pipeline folder (model_index.json)",
}
_LORA_NAMES = {
    "diffusers": "LoRA (diffusers/PEFT keys lora_A / lora_B)",
    "peft": "LoRA (PEFT adapter folder, lora_A / lora_B)",
    "kohya LoRA": "LoRA (kohya keys lora_down / lora_up)",
}
# Key prefixes of single-file checkpoints and ComfyUI difference files -> component (None: by block names).
_KEY_COMPONENTS = (
    ("model.diffusion_model.", None),
    ("diffusion_model.", None),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    ("first_stage_model.", "vae"),
    ("text_encoders.clip_l.", "text_encoder"),
    ("text_encoders.clip_g.", "text_encoder_2"),
    ("text_encoders.t5xxl.", "text_encoder_t5"),
)
_DIFFUSERS_COMPONENTS = (
    "unet",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "transformer",
    "controlnet",
    "vae",
)
_UNET_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out.")
_BARE_ROOTS = {
    "down_blocks": "unet",
    "mid_block": "unet",
    "up_blocks": "unet",
    "text_model": "text_encoder",
    "transformer_blocks": "transformer",
    "single_transformer_blocks": "transformer",
}


def component_of_key(module: str) -> str:
    """The pipeline component a key (or kohya module name) addresses: ``unet``, ``text_encoder``, ..."""
    from ..io.kohya import is_kohya_keys, kohya_component

    if is_kohya_keys({module + ".x": ()}):
        return kohya_component(module)
    for prefix, component in _KEY_COMPONENTS:
        if module.startswith(prefix):
            return component or ("unet" if module[len(prefix) :].startswith(_UNET_ROOTS) else "transformer")
    root = module.partition(".")[0]
    return root if root in _DIFFUSERS_COMPONENTS else _BARE_ROOTS.get(root, "unknown")


def _module_of(key: str, kind: str) -> str:
    """The layer a tensor key belongs to (``...to_q.lora_A.weight`` -> ``...to_q``)."""
    from ..io.kohya import is_kohya_keys
    from ..io.read import DIFF_SUFFIXES, LORA_SUFFIXES

    if is_kohya_keys({key: ()}):
        return key.partition(".")[0]
    suffixes = {"lora": (*LORA_SUFFIXES, ".alpha"), "diff": DIFF_SUFFIXES}.get(kind, ())
    suffix = next((sfx for sfx in suffixes if key.endswith(sfx)), None)
    return key[: -len(suffix)] if suffix else key.rpartition(".")[0]


def _rank(leaves: dict[str, tuple[int, ...]]) -> int | None:
    """A LoRA layer's rank: the rows of its down (``lora_A``) matrix."""
    down = next(
        (shape for leaf, shape in leaves.items() if leaf.endswith(("lora_A.weight", "down.weight"))), None
    )
    return down[0] if down else None


def other_report(path: Path, detected: Any) -> dict[str, Any]:
    """The report of a file that is not a BOFT adapter: format, target, layers, ranks, parameters, size."""
    from ..io.kohya import safetensors_header

    layers: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {}
    parameters: dict[str, int] = {}
    for hint, file in detected.files.items():
        shapes, _ = safetensors_header(file)
        for key, shape in shapes.items():
            key = key.removeprefix("base_model.model.")  # PEFT's wrapper prefix
            module = _module_of(key, detected.kind)
            comp = hint or component_of_key(module)
            layers.setdefault(comp, {}).setdefault(module, {})[key[len(module) :].lstrip(".")] = shape
            parameters[comp] = parameters.get(comp, 0) + math.prod(shape)
    components = {
        comp: {"layers": len(mods), "parameters": parameters.get(comp, 0)}
        | _layer_details(detected.kind, mods)
        for comp, mods in sorted(layers.items())
    }
    if detected.kind == "diffusers":
        components = {
            comp: {"class": cls, "layers": 0, "parameters": 0} for comp, cls in _pipeline_components(path)
        }
        layers = {comp: {} for comp in components}
    name = (
        _LORA_NAMES.get(detected.variant, f"{detected.variant} network") if detected.kind == "lora" else None
    )
    oft = f"kohya OFT network ({detected.variant})" if detected.kind == "kohya_oft" else None
    return {
        "path": str(path),
        "kind": detected.kind,
        "format": name or oft or _FORMAT_NAMES[detected.kind],
        "format_name": name or oft or _FORMAT_NAMES[detected.kind],
        "target": {
            "components": sorted(components),
            "family": _family(layers),
            "loads_with": LOADS_WITH[detected.kind],
        },
        "file_size_bytes": _size_on_disk(path),
        "layers": sum(c["layers"] for c in components.values()),
        "parameters": sum(c["parameters"] for c in components.values()),
        "components": components,
    }


def _layer_details(kind: str, modules: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, Any]:
    if kind == "lora":
        return {"ranks": sorted({r for leaves in modules.values() if (r := _rank(leaves)) is not None})}
    if kind == "kohya_oft":
        blocks = {
            leaves[leaf] for leaves in modules.values() for leaf in leaves if leaf.startswith("oft_blocks")
        }
        return {"oft_blocks_shapes": sorted(blocks)}
    return {}


def _family(layers: dict[str, dict[str, Any]]) -> str | None:
    """``sdxl`` / ``sd`` / ``flux`` / ``sd3`` where the keys say so (two text encoders, block names)."""
    names = " ".join(m for mods in layers.values() for m in mods)
    if "text_encoder_2" in layers and "unet" in layers:
        return "sdxl"
    for marker, family in (("double_blocks", "flux"), ("joint_blocks", "sd3")):
        if marker in names:
            return family
    return "sd" if "unet" in layers and "text_encoder_2" not in layers else None


def _pipeline_components(folder: Path) -> list[tuple[str, str]]:
    """``(component, class)`` of each entry of a diffusers folder's ``model_index.json`` that names a class."""
    from ..io import AdapterFormatError

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise AdapterFormatError(f"{folder / 'model_index.json'}: not readable ({err})") from None
    if not isinstance(index, dict):
        raise AdapterFormatError(f"{folder / 'model_index.json'}: not a JSON object")
    return sorted(
        (k, str(v[1])) for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] is not None
    )


def control_info(metadata: dict[str, str], source: str) -> dict[str, Any] | None:
    """What the adapter's control metadata says (``None``: not a control adapter); malformed is an error.

    Parsed by :func:`~boft_diffusion.io.load.control_metadata`, the loader's own reader: a path or hub id it
    records is reported, never opened."""
    from ..control import control_metadata

    return _reported(control_metadata(metadata, source))


def _reported(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """``info`` as the JSON report holds it (a light encoder's config as a dict, with its downsampling)."""
    if info is None or info["mode"] != "light":
        return info
    config = info["encoder"]
    return {**info, "encoder": config.to_dict(), "downsample": config.downsample}


def _control_line(info: dict[str, Any]) -> str:
    if info["mode"] == "light":
        enc = info["encoder"]
        what = (
            f"light encoder (ControlNetConditioningEmbedding, widths {enc['block_out_channels']}, "
            f"{enc['conditioning_channels']}-channel control image at {info['downsample']}x the latent size, "
            f"adds {enc['embedding_channels']} channels to the UNet's conv_in output)"
        )
        return f"Control: {what}; sample with `boft-diffusion sample --control IMAGE`"
    source = info.get("controlnet", "from_unet")
    made = "initialised from the UNet" if source == "from_unet" else f"trained on {_cut(source)!r}"
    fingerprint = info.get("controlnet_fingerprint")
    what = (
        f"ControlNetModel {made}, condition embedding widths "
        f"{info.get('conditioning_embedding_out_channels')}, conditioning scale {info.get('conditioning_scale', 1.0)}"
        + (f", fingerprint {_cut(fingerprint)}" if fingerprint else "")
    )
    give = (
        "" if source == "from_unet" else " --controlnet FOLDER (that ControlNet; never opened from the file)"
    )
    return f"Control: {what}; sample with `boft-diffusion sample{give} --control IMAGE`"


def _cut(text: str, limit: int = 120) -> str:
    """``text`` from a file's metadata, cut to ``limit`` characters for a report line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    return ""  # unreachable


def _target_line(report: dict[str, Any]) -> str:
    target = report["target"]
    family = f" ({target['family']})" if target.get("family") else ""
    return f"Target: {', '.join(target['components']) or 'none'}{family}; loads with {target['loads_with']}"


def format_other_report(report: dict[str, Any]) -> str:
    """The human-readable report of a file that is not a BOFT adapter."""
    lines = [
        f"File: {report['path']}, {_size(report['file_size_bytes'])} on disk",
        f"Format: {report['format_name']}",
        _target_line(report),
    ]
    for comp, info in report["components"].items():
        ranks = info.get("ranks")
        rank = f", rank {'/'.join(map(str, ranks))}" if ranks else ""
        blocks = info.get("oft_blocks_shapes")
        block = f", oft_blocks {' / '.join(str(tuple(b)) for b in blocks)}" if blocks else ""
        if "class" in info:
            lines.append(f"{comp}: {info['class']}")
            continue
        lines.append(f"{comp}: {info['layers']} layers{rank}{block}; {info['parameters']:,d} parameters")
    if report["kind"] != "diffusers":
        lines.append(f"Total: {report['layers']} layers, {report['parameters']:,d} parameters")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: summary lines, then one row per adapted layer."""
    if report.get("kind", "boft_diffusion") not in ("boft_diffusion", "peft_boft"):
        return format_other_report(report)
    lines = [
        f"Adapter: {report['path']} ({report['format']}, name {report['adapter_name']!r}), "
        f"{_size(report['file_size_bytes'])} on disk",
        f"Format: {report['format_name']}",
        _target_line(report),
    ]
    for comp, info in report["components"].items():
        cfg = info["config"]
        layout = (
            f"block size {cfg['boft_block_size']}"
            if cfg["boft_block_size"]
            else f"{cfg['boft_block_num']} blocks"
        )
        stored = info["stored_parameters"]
        lines.append(
            f"{comp}: {info['layers']} layers ({', '.join(cfg['target_modules'])}); {layout}, "
            f"{cfg['boft_n_butterfly_factor']} butterfly factor(s), dropout {cfg['boft_dropout']}, bias {cfg['bias']}; "
            f"{info['trainable_parameters']:,d} trainable parameters"
            + (f" ({stored:,d} stored in the file)" if stored != info["trainable_parameters"] else "")
        )
    if report.get("control"):
        lines.append(_control_line(report["control"]))
    for kind, shapes in (report.get("trained_state") or {}).items():
        held = ", ".join(f"{key} {'x'.join(map(str, shape))}" for key, shape in shapes.items())
        lines.append(f"Trained state {kind}: {held} (load_boft_weights brings it)")
    lines.append(f"Total trainable parameters: {report['trainable_parameters']:,d}")
    lines.append(
        f"Largest orthogonality error max|R R^T - I|: {report['max_orthogonality_error']:.2e}"
        + (f" ({report['max_orthogonality_error_layer']})" if report["max_orthogonality_error_layer"] else "")
    )
    rows = [(f"{c}.{n}", s) for c, info in report["components"].items() for n, s in info["per_layer"].items()]
    width = max((len(name) for name, _ in rows), default=5)
    lines.append("")
    lines.append("Rotation angles: principal angles 2*atan(sigma(Q)) of every block, degrees")
    lines.append(
        f"{'layer':<{width}}  {'d':>5} {'b':>4} {'r':>4} {'m':>2}  {'angle max':>9} {'mean':>7}  "
        f"{'scale min':>9} {'max':>7}  {'orth err':>8}"
    )
    for name, s in rows:
        lines.append(
            f"{name:<{width}}  {s['dim']:>5} {s['block_size']:>4} {s['block_num']:>4} {s['factors']:>2}  "
            f"{s['angle_max_deg']:>9.3f} {s['angle_mean_deg']:>7.3f}  {s['scale_min']:>9.4f} {s['scale_max']:>7.4f}  "
            f"{s['orthogonality_error']:>8.1e}"
        )
    return "\n".join(lines)


@reports_input_errors
def run(args: argparse.Namespace) -> int:
    path = Path(args.adapter)
    check_adapter_path(path)  # a missing path: the one error line every verb gives
    report = inspect_adapter(path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


COMMAND = Command(HELP, add_arguments, run)
