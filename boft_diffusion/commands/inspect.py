"""``boft-diffusion inspect``: what an adapter file holds, and how far it rotates each layer.

Reads a project adapter (file or folder) or a PEFT BOFT folder, never a pipeline. Per component: targets,
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

HELP = "show an adapter's components, targets, butterfly layout, size, orthogonality and rotation angles"
EXAMPLE = """examples:
  boft-diffusion inspect ./out/toy-boft
  boft-diffusion inspect ./peft-dreambooth-output --json > report.json

Rotation angles are the principal angles 2*atan(sigma(Q)) of each orthogonal block, in degrees.
An adapter holding NaN or inf values is refused with one error line (exit code 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example(parser, EXAMPLE)
    parser.add_argument(
        "adapter", metavar="ADAPTER", help="adapter file or folder (project format or PEFT BOFT)"
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
    """The full report of the adapter at ``path`` (what ``inspect --json`` prints)."""
    from ..io import is_peft_adapter, read_adapter, read_peft_adapter

    peft = is_peft_adapter(path)
    adapter = read_peft_adapter(path) if peft else read_adapter(path)
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
    return {
        "path": adapter.source,
        "format": "peft" if peft else f"boft_diffusion v{adapter.metadata.get('format_version')}",
        "adapter_name": adapter.adapter_name,
        "file_size_bytes": _size_on_disk(Path(adapter.source)),
        "trainable_parameters": sum(c["trainable_parameters"] for c in components.values()),
        "max_orthogonality_error": worst[0],
        "max_orthogonality_error_layer": worst[1],
        "control": control_info(adapter.metadata, adapter.source),
        "components": components,
    }


def control_info(metadata: dict[str, str], source: str) -> dict[str, Any] | None:
    """What the adapter's control metadata says (``None``: not a control adapter); malformed is an error."""
    from ..control import CONTROL_METADATA, LIGHT_CONTROL_METADATA, LightControlConfig
    from ..io import AdapterFormatError

    if CONTROL_METADATA not in metadata and LIGHT_CONTROL_METADATA not in metadata:
        return None
    try:
        info = json.loads(metadata.get(CONTROL_METADATA, '{"mode": "light"}'))
        if not isinstance(info, dict) or info.get("mode") not in ("light", "controlnet"):
            raise ValueError(f"{CONTROL_METADATA!r} must be an object with mode light or controlnet")
        if info["mode"] == "light":
            raw = metadata.get(LIGHT_CONTROL_METADATA)
            if raw is None:
                raise ValueError(f"no {LIGHT_CONTROL_METADATA!r} metadata describes its encoder")
            config = LightControlConfig.from_dict(json.loads(raw))
            info = {**info, "encoder": config.to_dict(), "downsample": config.downsample}
    except (ValueError, TypeError, RecursionError) as err:
        raise AdapterFormatError(f"{source}: invalid control metadata ({err})") from None
    return info


def _control_line(info: dict[str, Any]) -> str:
    if info["mode"] == "light":
        enc = info["encoder"]
        what = (
            f"light encoder (ControlNetConditioningEmbedding, widths {enc['block_out_channels']}, "
            f"{enc['conditioning_channels']}-channel control image at {info['downsample']}x the latent size, "
            f"adds {enc['embedding_channels']} channels to the UNet's conv_in output)"
        )
    else:
        source = info.get("controlnet", "from_unet")
        made = "initialised from the UNet" if source == "from_unet" else f"from {source}"
        what = (
            f"ControlNetModel {made}, condition embedding widths "
            f"{info.get('conditioning_embedding_out_channels')}, conditioning scale {info.get('conditioning_scale', 1.0)}"
        )
    return f"Control: {what}; sample with `boft-diffusion sample --control IMAGE`"


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    return ""  # unreachable


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: summary lines, then one row per adapted layer."""
    lines = [
        f"Adapter: {report['path']} ({report['format']}, name {report['adapter_name']!r}), "
        f"{_size(report['file_size_bytes'])} on disk",
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
    check_adapter_path(path)
    report = inspect_adapter(path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


COMMAND = Command(HELP, add_arguments, run)
