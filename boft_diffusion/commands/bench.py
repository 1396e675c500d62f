"""``boft-diffusion bench``: speed and memory of BOFT against its peers and the no-adapter floor.

The benchmark itself is :mod:`boft_diffusion.benchmark` (``scripts/benchmark.py`` runs this verb).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from . import Command, add_example, check_new_output, reports_input_errors

HELP = (
    "benchmark BOFT training and inference against PEFT LoRA, BOFT and OFT and the no-adapter floor, "
    "or (--memory) the peak memory of each training configuration"
)
EXAMPLE = """example:
  boft-diffusion bench --preset tiny                          # under a minute
  boft-diffusion bench --preset sd15 --json bench-sd15.json   # SD-1.5-shaped UNet, minutes on CPU
  boft-diffusion bench --preset sd15 --latent-size 64         # the same at 512 px (4096 tokens)
  boft-diffusion bench --preset sd15 --profile                # one layer's time by category
  boft-diffusion bench --memory --preset tiny                 # peak memory per training configuration"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _benchmark_arguments(parser)
    add_example(parser, EXAMPLE)


@reports_input_errors
def run(args: argparse.Namespace) -> int:
    if args.json is not None:  # before minutes of measuring, not after
        check_new_output(args.json, inputs=(), overwrite=True)  # the benchmark reads no file
    return _run(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``boft-diffusion bench`` (and ``scripts/benchmark.py``, which runs it)."""
    from ..benchmark import DEFAULT_BAR, MEMORY_CONFIGURATIONS, MEMORY_STEPS, METHODS, PRESETS

    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="model shape (default: tiny)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=None,
        help="methods to run (default: all; those whose package is missing are listed as unavailable)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=_positive_int, default=None, help="interleaved rounds (default: the preset's)"
    )
    parser.add_argument(
        "--latent-size", type=_positive_int, default=None, metavar="N",
        help="latent side N (N×N latents; Flux: N² image tokens), default the preset's "
        "(sd15: 32 = 256 px; 64 = 512 px, 96 = 768 px; sdxl: 128 = 1024 px)",
    )  # fmt: skip
    parser.add_argument(
        "--timed-steps", type=_positive_int, default=None,
        help=f"timed training steps per worker (--memory: training steps per configuration, default {MEMORY_STEPS})",
    )  # fmt: skip
    parser.add_argument(
        "--forward-repeats", type=_positive_int, default=None,
        help="timed forward passes per kind (base, unmerged, merged) per worker",
    )  # fmt: skip
    parser.add_argument(
        "--bar", type=float, default=DEFAULT_BAR,
        help=f"step × LoRA that the '≤ bar' column tests the whole spread against (default {DEFAULT_BAR})",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="instead of the benchmark: profile one adapted projection of the preset's width by category",
    )  # fmt: skip
    parser.add_argument(
        "--memory", action="store_true",
        help="instead of the benchmark: peak memory of a training step per configuration (floor, LoRA, BOFT, "
        "BOFT with gradient checkpointing, 8-bit AdamW, a quantized base), each in its own worker",
    )  # fmt: skip
    parser.add_argument(
        "--configurations", nargs="+", choices=list(MEMORY_CONFIGURATIONS), default=None,
        help="with --memory: the configurations to measure (default: all; on the CPU all but the bitsandbytes bases)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--json", type=Path, default=None, help="write raw and summarised results here")


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _run(args: argparse.Namespace) -> int:
    """Run the benchmark (or the profile) as ``args`` say; print the table; write JSON if asked."""
    from ..benchmark import (
        METHODS,
        PRESETS,
        available_cores,
        benchmark_report,
        format_profile,
        format_report,
        profile_layer,
        unavailable_methods,
        with_overrides,
    )

    preset = with_overrides(PRESETS[args.preset], args.latent_size, args.timed_steps, args.forward_repeats)
    device = _resolve_device(args.device)
    if args.profile:
        profile = profile_layer(preset, device)
        print(format_profile(profile))
        if args.json is not None:
            atomic_write_text(
                args.json, json.dumps({"preset": dataclasses.asdict(preset), "profile": profile}, indent=2)
            )
            print(f"wrote {args.json}")
        return 0
    if args.memory:
        return _run_memory(args, preset, device)
    methods = [METHODS[k] for k in (args.methods or METHODS)]
    for key, reason in unavailable_methods(methods).items():
        print(f"unavailable: {key} ({METHODS[key].label}): {reason}")
    rounds = args.rounds or preset.rounds
    print(f"preset {preset.name}, latent {preset.latent_size}, device {device}, "
          f"{available_cores()} threads, {rounds} round(s)")  # fmt: skip
    report = benchmark_report(preset, methods, device, rounds, args.bar)
    return _finish(report, format_report(report), args.json)


def _run_memory(args: argparse.Namespace, preset: Any, device: str) -> int:
    """``--memory``: each configuration's peak in its own worker; the table; JSON if asked."""
    from ..benchmark import MEMORY_CONFIGURATIONS, MEMORY_STEPS, format_memory_table, memory_report
    from ..benchmark.memory import default_configurations

    configs = [MEMORY_CONFIGURATIONS[k] for k in (args.configurations or default_configurations(device))]
    steps = args.timed_steps or MEMORY_STEPS
    print(f"memory: preset {preset.name}, latent {preset.latent_size}, device {device}, {steps} step(s)")
    report = memory_report(preset, configs, device, steps)
    return _finish(report, format_memory_table(report), args.json)


def _finish(report: dict[str, Any], table: str, json_path: Path | None) -> int:
    """Print the table and the total time, write the JSON if asked; 1 if a method or configuration failed."""
    print()
    print(table)
    print(f"\ntotal {report['elapsed_s']:.0f} s")
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2))
        print(f"wrote {json_path}")
    return 1 if report["failed"] else 0


COMMAND = Command(HELP, add_arguments, run)
