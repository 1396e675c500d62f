"""Peak memory of a training step per configuration: the floor, LoRA, BOFT, and BOFT with each memory saver.

``boft-diffusion bench --memory`` runs each :class:`MemoryConfiguration` in its own worker process (as the
speed benchmark runs each method), so the peak is that configuration's own: ``ru_maxrss`` on the CPU (the
process's resident peak, the Python and torch runtime included), ``torch.cuda.max_memory_allocated`` on
CUDA (tensors only). The worker imports the libraries the configuration uses and reads the memory (the
*runtime*), builds the preset's model (frozen weights in the recipes' dtype: float32 on the CPU, bf16 on
CUDA; a quantized base one layer at a time, so its peak is its own) and reads it again (the *model*), adds
the configuration's adapter and memory savers, runs a few training steps (:func:`~.measure.training_step`,
the recipes' step) and reads the peak. The increment (peak minus what was held after building the model)
is what training adds on top of holding the weights. On the CPU the workers run with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed (see :data:`~.runner.MEMORY_WORKER_ENV`), so that freed tensors leave the
resident set and the peak follows the live tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

import torch
from torch import nn

from ..inject import boft_layers
from ..quantized import quantize_linear, recompute_in_backward
from .adapters import Adapter, FloorTaps
from .measure import Clock, peak_memory_bytes, training_step
from .models import MODEL_SHAPES, build_model, make_inputs, present_targets
from .presets import METHODS, Preset

MEMORY_STEPS = 3
"""Training steps per configuration: the optimizer's state exists from the first, the peak is steady after."""

QUANTIZATION_PACKAGES = {
    "torchao-int8": "torchao",
    "quanto-int8": "optimum.quanto",
    "bnb-nf4": "bitsandbytes",
    "bnb-int8": "bitsandbytes",
}
"""The package each quantized base needs."""


@dataclass(frozen=True)
class MemoryConfiguration:
    """One way to train: an adapter (a :data:`~.presets.METHODS` key; ``floor``: none) and the memory savers."""

    key: str
    label: str
    method: str
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    """``adamw`` (torch) or ``adamw_8bit`` (bitsandbytes), as ``optim.optimizer``."""
    quantization: str = "none"
    """``none``, ``torchao-int8`` (weight-only int8), ``quanto-int8`` (optimum-quanto), ``bnb-nf4`` or ``bnb-int8``
    (bitsandbytes, whose CPU kernels run here too): the frozen base's Linear layers."""

    def unavailable_reason(self) -> str | None:
        """Why this configuration cannot run here (a missing package), or ``None`` when it can."""
        if (reason := METHODS[self.method].unavailable_reason()) is not None:
            return reason
        if self.optimizer == "adamw_8bit" and find_spec("bitsandbytes") is None:
            return "8-bit AdamW needs bitsandbytes (pip install bitsandbytes)"
        package = QUANTIZATION_PACKAGES.get(self.quantization)
        if package is not None and find_spec(package.split(".")[0]) is None:
            return f"{self.quantization} needs {package} (pip install {package.replace('.', '-')})"
        return None


MEMORY_CONFIGURATIONS = {
    c.key: c
    for c in (
        MemoryConfiguration("floor", "no adapter (floor)", "floor"),
        MemoryConfiguration("lora", "PEFT LoRA r=8", "lora"),
        MemoryConfiguration("boft", "BOFT b=8, m=2", "boft-b8-m2"),
        MemoryConfiguration(
            "boft-checkpointing", "BOFT + gradient checkpointing", "boft-b8-m2", gradient_checkpointing=True
        ),
        MemoryConfiguration("boft-adamw8bit", "BOFT + 8-bit AdamW", "boft-b8-m2", optimizer="adamw_8bit"),
        MemoryConfiguration(
            "boft-torchao-int8", "BOFT on a torchao int8 base", "boft-b8-m2", quantization="torchao-int8"
        ),
        MemoryConfiguration(
            "boft-quanto-int8", "BOFT on a quanto int8 base", "boft-b8-m2", quantization="quanto-int8"
        ),
        MemoryConfiguration(
            "boft-bnb-nf4", "BOFT on a bitsandbytes NF4 base", "boft-b8-m2", quantization="bnb-nf4"
        ),
        MemoryConfiguration(
            "boft-bnb-int8", "BOFT on a bitsandbytes int8 base", "boft-b8-m2", quantization="bnb-int8"
        ),
        MemoryConfiguration(
            "boft-all",
            "BOFT + checkpointing + 8-bit AdamW + quanto int8",
            "boft-b8-m2",
            gradient_checkpointing=True,
            optimizer="adamw_8bit",
            quantization="quanto-int8",
        ),  # fmt: skip
    )
}
"""The configurations ``--memory`` measures, in table order (``boft`` is the reference of "× BOFT")."""


def default_configurations(device: str) -> list[str]:
    """What ``--memory`` measures unless told: every configuration on CUDA; on the CPU all but the
    bitsandbytes bases. Their CPU quantization holds about 1 GB more than the model while SD 1.5's UNet is
    built, which ``ru_maxrss`` (a peak that cannot be reset) then reports as the model and the step; on CUDA
    the peak is reset after the build. They run on the CPU when named (``--configurations``)."""
    cuda = str(device).startswith("cuda")
    return [k for k, c in MEMORY_CONFIGURATIONS.items() if cuda or not c.quantization.startswith("bnb")]


def quantizer(backend: str) -> Callable[[nn.Linear], nn.Module] | None:
    """A frozen Linear to its quantized replacement (:func:`~boft_diffusion.quantized.quantize_linear`, each
    library's own entry point), or ``None`` for ``none``."""
    if backend == "none":
        return None
    if backend not in QUANTIZATION_PACKAGES:
        raise ValueError(
            f"unknown quantization {backend!r}: none, torchao-int8, quanto-int8, bnb-nf4 or bnb-int8"
        )
    return functools.partial(quantize_linear, backend=backend)


def _optimizer(config: MemoryConfiguration, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as the recipes make it (``optim.optimizer``): torch's, or bitsandbytes' 8-bit one."""
    if config.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def _import_libraries(config: MemoryConfiguration) -> None:
    """Import what ``config`` will use (diffusers, PEFT, bitsandbytes), before the runtime's memory is read."""
    import diffusers  # noqa: F401

    if METHODS[config.method].kind == "lora":
        import peft  # noqa: F401
    if config.optimizer == "adamw_8bit":
        import bitsandbytes  # noqa: F401


def _memory_now(device: torch.device) -> int:
    """Memory held now: CUDA allocations, or on the CPU the resident peak so far (nothing has been freed yet)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return peak_memory_bytes(device)


def measure_memory(
    config: MemoryConfiguration, preset: Preset, device: torch.device | str = "cpu", steps: int = MEMORY_STEPS
) -> dict[str, Any]:
    """Memory before the model (``runtime_bytes``: the libraries; zero-ish on CUDA), after building it
    (``model_bytes``) and the peak over ``steps`` training steps of ``config`` (``peak_memory_bytes``), in this
    process (the runner calls it in a fresh worker)."""
    device = torch.device(device)
    clock = Clock(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None  # the recipes' frozen weights under bf16
    quantize = quantizer(config.quantization)
    _import_libraries(config)  # imports count in the runtime, not in the model or the step
    runtime_bytes = _memory_now(device)
    model = build_model(preset, device, dtype=dtype, quantize=quantize)
    model_bytes = _memory_now(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak from here: the weights and the step
    targets = present_targets(model, MODEL_SHAPES[preset.shape].targets)
    adapter = Adapter(METHODS[config.method], model, targets)
    # As the recipes do: the torchao layers outside BOFT's (which recompute their whole call) keep only
    # their input for backward.
    recompute_in_backward(model, skip=[layer.base_layer for layer in boft_layers(model).values()])
    params = adapter.trainable_parameters()
    for param in params:  # trained tensors stay float32 (the recipes' cast_frozen_weights)
        param.data = param.data.float()
    taps = FloorTaps(model, targets)
    taps.enable(not adapter.trains)  # the floor: what any adapter of these layers costs
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = _optimizer(config, params or taps.anchors)
    inputs = make_inputs(preset, device)
    model.train()
    for _ in range(steps):
        loss = training_step(model, inputs, optimizer, clock)
    clock.sync()
    return {
        "configuration": config.key,
        "latent_size": preset.latent_size,
        "input_shape": list(inputs.sample.shape),
        "trainable_params": sum(p.numel() for p in params),
        "steps": steps,
        "loss": float(loss.detach()),
        "runtime_bytes": runtime_bytes,
        "model_bytes": model_bytes,
        "peak_memory_bytes": peak_memory_bytes(device),
    }


def memory_unavailable(configs: list[MemoryConfiguration]) -> dict[str, str]:
    """``{key: reason}`` of the configurations that cannot run here."""
    return {c.key: reason for c in configs if (reason := c.unavailable_reason()) is not None}


def memory_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configuration of ``report`` (measured, failed or unavailable), in table order, with the
    model, peak and increment in MB and the peak and increment relative to BOFT's."""
    runs, mb = report["runs"], 1024**2
    reference = runs.get("boft")
    rows = []
    for key in report["configurations"]:
        row: dict[str, Any] = {"key": key, "label": MEMORY_CONFIGURATIONS[key].label}
        if key in runs:
            run = runs[key]
            increment = run["peak_memory_bytes"] - run["model_bytes"]
            row.update(
                trainable_params=run["trainable_params"],
                runtime_mb=run["runtime_bytes"] / mb,
                model_mb=(run["model_bytes"] - run["runtime_bytes"]) / mb,
                peak_mb=run["peak_memory_bytes"] / mb,
                increment_mb=increment / mb,
            )
            if reference is not None:
                ref_increment = reference["peak_memory_bytes"] - reference["model_bytes"]
                row["peak_vs_boft"] = run["peak_memory_bytes"] / reference["peak_memory_bytes"]
                row["increment_vs_boft"] = increment / ref_increment if ref_increment > 0 else None
        elif key in report["failed"]:
            row["failed"] = report["failed"][key]
        else:
            row["unavailable"] = report["unavailable"].get(key, "not run")
        rows.append(row)
    return rows


def format_memory_table(report: dict[str, Any]) -> str:
    """Markdown table of :func:`memory_rows`, its note, and the rows not measured (with why)."""

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    head = ("| configuration | trainable params | runtime MB | model MB | peak MB | increment over model MB "
            "| peak × BOFT | increment × BOFT |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    notes = []
    for row in memory_rows(report):
        if "peak_mb" not in row:  # the reason follows the table
            status = "failed" if "failed" in row else "unavailable"
            lines.append(f"| {row['label']} | — | — | — | {status} | — | — | — |")
            notes.append(f"{status}: {row['key']} ({row['label']}): {row[status]}")
            continue
        lines.append("| " + " | ".join([
            row["label"], f"{row['trainable_params']:,}", f"{row['runtime_mb']:.0f}", f"{row['model_mb']:.0f}",
            f"{row['peak_mb']:.0f}",
            f"{row['increment_mb']:.0f}", cell(row.get("peak_vs_boft"), ".2f"),
            cell(row.get("increment_vs_boft"), ".2f"),
        ]) + " |")  # fmt: skip
    kind = "max_memory_allocated (tensors)" if report["device"].startswith("cuda") else "ru_maxrss (process)"
    note = (
        f"Peak: {kind} over {report['steps']} training steps, one worker process per configuration. Runtime: "
        "the same before the model is built (the libraries imported). Model: what building the model added (frozen "
        "weights, a quantized base quantized). Increment over model: peak minus runtime and model, what training "
        "adds. × BOFT: divided by BOFT's (b=8, m=2, AdamW, no saver)."
    )
    return "\n".join([*lines, "", note, *notes])
