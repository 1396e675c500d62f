#!/usr/bin/env python
"""One prepared GPU run of the benchmark: SD-1.5 at 512 px and SDXL at 1024 px, bf16 autocast; then the peak
memory of each training configuration.

    python scripts/gpu_benchmark.py OUT_DIR                       # needs CUDA; a few minutes on one GPU
    python scripts/gpu_benchmark.py OUT_DIR --presets sd15        # one preset only
    python scripts/gpu_benchmark.py OUT_DIR --no-memory           # the speed tables only
    python scripts/gpu_benchmark.py OUT_DIR --allow-cpu           # format check: tiny preset on the CPU

Runs the methods floor, lora, boft-b8-m2, boft-b4-m4, peft-boft and peft-oft (each in its own worker
process, interleaved over ``--rounds`` rounds, see ``boft_diffusion/benchmark/``) on the ``sd15``
preset at 64×64 latents and the ``sdxl`` preset at 128×128 latents, and writes ``bench-gpu.md`` (one
table per preset, with the median and spread of every ratio) and ``bench-gpu.json`` (the full
reports) into OUT_DIR, rewritten after each preset so a run cut short keeps what it measured. A
preset whose run fails is recorded with its error and the next one still runs (exit status 1).
After each preset's speed table comes its memory table (``boft-diffusion bench --memory``, see
``boft_diffusion/benchmark/memory.py``): per configuration (floor, LoRA, BOFT, BOFT with gradient
checkpointing, with 8-bit AdamW, on a torchao or quanto int8 base, with all of them) the memory after building
the model (bf16 frozen weights) and ``torch.cuda.max_memory_allocated`` over a few training steps, each in its
own worker; a configuration that fails is a row marked failed, with its error under the table (exit status 1).
PEFT's BOFT compiles its CUDA extension on first use where ``ninja`` and ``nvcc`` are present (a
minute, once per machine); without them it runs its ``m = 1`` path.

Without CUDA it refuses (exit 2) unless ``--allow-cpu``, which runs the ``tiny`` preset on the CPU
to check the output format, not to measure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from boft_diffusion import benchmark
from boft_diffusion.atomic import atomic_write_text

RUNS = {"sd15": 64, "sdxl": 128}
"""Presets and their latent side: SD-1.5 at 512 px, SDXL at 1024 px."""
METHODS = ["floor", "lora", "boft-b8-m2", "boft-b4-m4", "peft-boft", "peft-oft"]
TIMED_STEPS = 10
"""Timed steps per worker on the GPU (a step is tens of milliseconds; worker start-up dominates)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for bench-gpu.md and bench-gpu.json (created)")
    parser.add_argument("--presets", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--methods", nargs="+", choices=list(benchmark.METHODS), default=METHODS)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument(
        "--timed-steps", type=int, default=None, help=f"default {TIMED_STEPS} (CPU: the preset's)"
    )
    parser.add_argument("--bar", type=float, default=benchmark.DEFAULT_BAR, help="step × LoRA bar")
    parser.add_argument(
        "--memory-configurations", nargs="+", choices=list(benchmark.MEMORY_CONFIGURATIONS),
        default=list(benchmark.MEMORY_CONFIGURATIONS), help="memory table rows (default: all)",
    )  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip the memory tables")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="without CUDA: run the tiny preset on the CPU (format check)"
    )
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[str, list[benchmark.Preset]] | None:
    """The device and the presets to run, or ``None`` when there is no CUDA and no ``--allow-cpu``."""
    if torch.cuda.is_available():
        steps = args.timed_steps or TIMED_STEPS
        presets = [benchmark.with_overrides(benchmark.PRESETS[n], RUNS[n], steps) for n in args.presets]
        return "cuda", presets
    if not args.allow_cpu:
        return None
    return "cpu", [benchmark.with_overrides(benchmark.PRESETS["tiny"], timed_steps=args.timed_steps)]


def markdown(header: str, reports: list[dict]) -> str:
    parts = [header]
    for report in reports:
        preset, size = report["preset"]["name"], report["latent_size"]
        parts.append(f"## {preset}, {size}×{size} latents, {report['rounds']} round(s)")
        parts.append(report["text"] if "error" not in report else f"failed: {report['error']}")
        if "memory" in report:
            parts.append(f"### Peak memory per configuration\n\n{report['memory']['text']}")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    planned = plan(args)
    if planned is None:
        print(
            "gpu_benchmark: no CUDA device here; pass --allow-cpu for a tiny-preset format check",
            file=sys.stderr,
        )
        return 2
    device, presets = planned
    methods = [benchmark.METHODS[k] for k in args.methods]
    configs = [benchmark.MEMORY_CONFIGURATIONS[k] for k in args.memory_configurations]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (format check, not a measurement)"
    header = (
        f"# BOFT benchmark on {name}\n\ntorch {torch.__version__}, "
        f"{'bf16 autocast' if device == 'cuda' else 'float32'}, batch 1, command `{' '.join(sys.argv)}`"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    reports: list[dict] = []
    failed = False
    start = time.perf_counter()
    for preset in presets:
        print(f"== {preset.name}, latent {preset.latent_size}, {device}", flush=True)
        try:
            report = benchmark.benchmark_report(preset, methods, device, args.rounds, args.bar)
            report["text"] = benchmark.format_report(report)
            print(report["text"], flush=True)
        except RuntimeError as err:  # a failed worker: keep the other presets
            failed = True
            report = {"preset": {"name": preset.name}, "latent_size": preset.latent_size,
                      "rounds": args.rounds, "error": str(err)[-2000:]}  # fmt: skip
            print(f"{preset.name} failed: {err}", file=sys.stderr, flush=True)
        if not args.no_memory:
            memory = benchmark.memory_report(preset, configs, device)
            memory["text"] = benchmark.format_memory_table(memory)
            print(memory["text"], flush=True)
            failed = failed or bool(memory["failed"])
            report["memory"] = memory
        reports.append(report)
        atomic_write_text(args.out / "bench-gpu.md", markdown(header, reports))
        atomic_write_text(
            args.out / "bench-gpu.json",
            json.dumps(
                {"device": name, "elapsed_s": time.perf_counter() - start, "reports": reports}, indent=2
            ),
        )
    print(f"wrote {args.out / 'bench-gpu.md'} and bench-gpu.json in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
