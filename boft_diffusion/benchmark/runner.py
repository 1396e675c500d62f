"""The benchmark's processes: a worker per method and round (``python -m boft_diffusion.benchmark --worker ...``),
interleaved, and the JSON report; with ``--memory``, a worker per memory configuration and its report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from .measure import measure
from .memory import (
    MEMORY_CONFIGURATIONS,
    MEMORY_STEPS,
    MemoryConfiguration,
    measure_memory,
    memory_rows,
    memory_unavailable,
)
from .models import with_overrides
from .presets import METHODS, PRESETS, Method, Preset, unavailable_methods
from .report import DEFAULT_BAR, summarize


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker_command(method: str, preset: Preset, device: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "boft_diffusion.benchmark", "--worker", method,
            "--preset", preset.name, "--latent-size", str(preset.latent_size),
            "--timed-steps", str(preset.timed_steps), "--forward-repeats", str(preset.forward_repeats),
            "--device", device, "--worker-out", str(out)]  # fmt: skip


def _run_worker(command: list[str], out: Path, env: dict[str, str] | None = None) -> dict[str, Any] | str:
    """Run one worker process: its JSON result, or the last line of its error output when it failed."""
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return lines[-1]
    return json.loads(out.read_text())


def run_benchmark(
    preset: Preset,
    methods: list[Method],
    device: str,
    rounds: int,
    log: Callable[[str], None] = print,
    failed: dict[str, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run every method once per round in its own process; rounds alternate the method order.

    A worker that fails drops its method from the results and from later rounds (its last error
    line goes into ``failed``, by key); the other methods' measurements are kept.
    """
    failed = {} if failed is None else failed
    results: dict[str, list[dict[str, Any]]] = {m.key: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = methods if r % 2 == 0 else methods[::-1]
            for method in (m for m in order if m.key not in failed):
                out = Path(tmp) / f"{method.key}-{r}.json"
                start = time.perf_counter()
                result = _run_worker(_worker_command(method.key, preset, device, out), out)
                if isinstance(result, str):
                    failed[method.key] = result
                    del results[method.key]
                    log(f"round {r + 1}/{rounds}  {method.label:<22} FAILED: {result}")
                    continue
                results[method.key].append(result)
                log(f"round {r + 1}/{rounds}  {method.label:<22} {time.perf_counter() - start:6.1f} s")
    return results


def benchmark_report(
    preset: Preset, methods: list[Method], device: str, rounds: int, bar: float = DEFAULT_BAR,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Run the available ``methods`` and return the JSON report (the unavailable ones with their reason)."""
    unavailable = unavailable_methods(methods)
    start = time.perf_counter()
    failed: dict[str, str] = {}
    runs = run_benchmark(
        preset, [m for m in methods if m.key not in unavailable], device, rounds, log, failed
    )
    return {
        "preset": dataclasses.asdict(preset),
        "latent_size": preset.latent_size,
        "device": device,
        "threads": available_cores(),
        "rounds": rounds,
        "bar": bar,
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "elapsed_s": time.perf_counter() - start,
        "unavailable": unavailable,
        "failed": failed,
        "summary": summarize(runs),
        "runs": runs,
    }


MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
"""Added to the memory workers' environment: glibc serves every allocation of 64 KiB or more with its own mapping and
unmaps it when freed, so the resident peak follows the live tensors. (By default glibc raises that threshold
as large blocks are freed and keeps later ones in its heap: a quantized base, built a float32 layer at a time,
would leave the freed float32 layers resident and in ``ru_maxrss``.) Other allocators ignore the variable."""


def memory_report(
    preset: Preset, configs: list[MemoryConfiguration], device: str, steps: int = MEMORY_STEPS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Run each available configuration once in its own worker; the JSON report (``rows``: the table's)."""
    unavailable = memory_unavailable(configs)
    start = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in (c for c in configs if c.key not in unavailable):
            out = Path(tmp) / f"{config.key}.json"
            began = time.perf_counter()
            command = [*_worker_command(config.key, preset, device, out), "--memory", "--steps", str(steps)]
            result = _run_worker(command, out, {**os.environ, **MEMORY_WORKER_ENV})
            if isinstance(result, str):
                failed[config.key] = result
                log(f"{config.label:<48} FAILED: {result}")
                continue
            runs[config.key] = result
            log(f"{config.label:<48} {time.perf_counter() - began:6.1f} s")
    report = {
        "preset": dataclasses.asdict(preset),
        "latent_size": preset.latent_size,
        "device": device,
        "threads": available_cores(),
        "steps": steps,
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "elapsed_s": time.perf_counter() - start,
        "configurations": [c.key for c in configs],
        "unavailable": unavailable,
        "failed": failed,
        "runs": runs,
    }
    report["rows"] = memory_rows(report)
    return report


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="benchmark worker: one method, one process")
    parser.add_argument("--worker", required=True, choices=sorted({*METHODS, *MEMORY_CONFIGURATIONS}))
    parser.add_argument(
        "--memory", action="store_true", help="measure the memory configuration --worker names (memory mode)"
    )
    parser.add_argument("--steps", type=int, default=MEMORY_STEPS, help="training steps of a memory worker")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--latent-size", type=int, default=None)
    parser.add_argument("--timed-steps", type=int, default=None)
    parser.add_argument("--forward-repeats", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker-out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(available_cores())
    preset = with_overrides(PRESETS[args.preset], args.latent_size, args.timed_steps, args.forward_repeats)
    if args.memory:
        result = measure_memory(MEMORY_CONFIGURATIONS[args.worker], preset, args.device, args.steps)
    else:
        result = measure(METHODS[args.worker], preset, args.device)
    atomic_write_text(args.worker_out, json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The worker process (``--worker METHOD ...``: one method, one process); the benchmark's command line
    is ``boft-diffusion bench`` (:mod:`boft_diffusion.commands.bench`)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" not in argv:
        print(
            "this module runs benchmark workers; run the benchmark with `boft-diffusion bench`",
            file=sys.stderr,
        )
        return 2
    return _worker(argv)
