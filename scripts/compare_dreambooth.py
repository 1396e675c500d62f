#!/usr/bin/env python
"""Full finetuning, LoRA, OFT and BOFT on the same DreamBooth: subject fidelity against class drift, over seeds.

    python scripts/compare_dreambooth.py [--methods full lora oft boft-m2 boft-m4] [--seeds 0 1 2]
        [--steps N] [--full-lr 3e-4] [--lora-lr LR] [--out compare_dreambooth.json] [--overwrite] [KEY=VALUE ...]

Trains the embedded default of ``boft-diffusion train dreambooth`` (the tiny offline pipeline, the
subject ``sks toy``, prior preservation) once per method and seed, with the same data, steps and
probe, and prints a table in the spirit of the OFT paper's Table 1 and PEFT's image-generation
benchmark: subject fidelity and prompt fidelity (higher is better) against class drift (lower is
better), seconds per training step, peak memory and trainable parameters. Each cell is the mean over
the seeds with the lowest and highest seed's value in parentheses (the JSON also holds the sample standard
deviation); the base model's row ("before") is measured once, in the first run, as every run starts
from the same base and samples the same probe (metrics.seed).

The methods (``--methods`` picks some):

- ``full``: every UNet parameter trains, no adapter; the text encoder stays frozen. Learning rate
  ``--full-lr`` (default 3e-4: a full finetune does not take an adapter's rate; on the tiny model 3e-4
  taught the subject, 1e-3 broke the samples).
- ``lora``: PEFT LoRA (``inject_adapter_in_model``, alpha = rank) on exactly the UNet and text-encoder
  layers BOFT adapts, at the rank whose factors hold closest to as many parameters as BOFT (m=2, b=8)
  trains there (generators, scales and the adapted layers' biases). Learning rate ``--lora-lr`` (default: the config's).
- ``oft``, ``boft-m2``, ``boft-m4``: BOFT with m = 1, 2, 4 butterfly factors of blocks b = 16, 8, 4. A
  layer of width d holds m * d * (b - 1) / 2 rotation parameters, so the three train about as many
  (15 : 14 : 12 per d/2; every input width of the default targets on the tiny model, convolutions
  included, takes all three). Learning rate: the config's optim.learning_rate (2e-3). ``oft`` is the embedded
  default's own layout; the method's keys win over KEY=VALUE overrides.

Nothing was tuned per method beyond these defaults. Only the adapter (or its absence) differs: data,
loss, loop and measurement are the DreamBooth recipe's (:class:`FullDreamBoothRecipe` and
:class:`LoRADreamBoothRecipe` override ``_add_adapters`` only, and no adapter file is saved). Every run
trains in a fresh process of its own, so its peak memory (of the training phase: CUDA's
``max_memory_allocated``; on the CPU the peak resident set size, reset before training on Linux) and
its step times (the median step) are its own; compare them within one invocation only. KEY=VALUE
overrides go to every run (before the method's own keys); runs write only into a temporary folder.
Bad input (an unknown method, a method whose package is missing, an existing ``--out``, a bad
override) is one ``error:`` line and exit code 2 before anything trains.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from boft_diffusion.atomic import atomic_file
from boft_diffusion.benchmark import lora_rank_for
from boft_diffusion.benchmark import peak_memory_bytes as process_peak_rss
from boft_diffusion.commands import (
    CommandError,
    OneLineErrorParser,
    check_new_output,
    number,
    reports_input_errors,
)
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, DreamBoothRecipe
from boft_diffusion.training.args import load_config

MEASURES = ("subject_fidelity", "prompt_fidelity", "class_drift")
"""The recipe's metrics (metrics.json's ``after``), in the table's order."""


class FullDreamBoothRecipe(DreamBoothRecipe):
    """The DreamBooth recipe finetuning every parameter of the UNet (no adapter; text encoder frozen).

    For this comparison only: its ``save`` is not used (the project's adapter file holds BOFT adapters).
    """

    def _add_adapters(self) -> dict[str, nn.Module]:
        name = self.family.denoiser
        return {name: getattr(self.pipe, name).requires_grad_(True)}


class LoRADreamBoothRecipe(DreamBoothRecipe):
    """The DreamBooth recipe with PEFT LoRA instead of BOFT, on the layers the config's BOFT adapter
    targets, at the rank whose factors hold closest to as many parameters as that adapter would train.

    For this comparison only: its ``save`` is not used (the project's adapter file holds BOFT adapters).
    """

    def __init__(self, cfg: DreamBoothConfig) -> None:
        super().__init__(cfg)
        self.rank = 0

    def _add_adapters(self) -> dict[str, nn.Module]:
        from peft import LoraConfig, inject_adapter_in_model

        plans = self._plan_adapters()  # the BOFT adapter the budget is matched to (nothing changes)
        budget = sum(math.prod(shape) for plan in plans.values() for shape in plan.shapes().values())
        layers = {name: list(plan.targets) for name, plan in plans.items()}
        modules = [getattr(self.pipe, name).get_submodule(p) for name, paths in layers.items() for p in paths]
        self.rank = lora_rank_for(modules, budget)
        components = {}
        for name, paths in layers.items():
            config = LoraConfig(
                r=self.rank, lora_alpha=self.rank, init_lora_weights="gaussian", target_modules=paths
            )
            with torch.random.fork_rng(devices=[]):  # its init's draws leave training's noise as every row's
                components[name] = inject_adapter_in_model(
                    config, getattr(self.pipe, name)
                )  # only LoRA trains
        return components


@dataclass(frozen=True)
class Method:
    label: str
    recipe: type[DreamBoothRecipe]
    overrides: tuple[str, ...] = ()
    package: str | None = None
    """A package the method needs beyond the project's own (checked before anything trains)."""


BOFT_M2 = ("boft.n_butterfly_factor=2", "boft.block_size=8", "boft.block_num=0")

METHODS = {
    "full": Method("full finetune (UNet)", FullDreamBoothRecipe, ("boft.train_text_encoder=false",)),
    "lora": Method("LoRA (PEFT)", LoRADreamBoothRecipe, BOFT_M2, package="peft"),
    "oft": Method("OFT (m=1, b=16)", DreamBoothRecipe, ("boft.n_butterfly_factor=1", "boft.block_size=16", "boft.block_num=0")),
    "boft-m2": Method("BOFT (m=2, b=8)", DreamBoothRecipe, BOFT_M2),
    "boft-m4": Method("BOFT (m=4, b=4)", DreamBoothRecipe, ("boft.n_butterfly_factor=4", "boft.block_size=4", "boft.block_num=0")),
}  # fmt: skip


# --- one run (in a process of its own) --------------------------------------------------------------
PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak anew: CUDA's allocator statistics, or Linux's peak RSS (writing 5 to clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif PROC_CLEAR_REFS.exists():
        PROC_CLEAR_REFS.write_text("5")


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak since :func:`reset_peak_memory`: CUDA allocations, Linux's VmHWM; elsewhere the
    process's peak RSS since it began."""
    if device.type != "cuda" and PROC_STATUS.exists():
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return process_peak_rss(device)


def train_one(method: str, overrides: list[str], measure_before: bool) -> dict[str, Any]:
    """Set up, (measure the base,) train and measure one run; its row of the comparison."""
    recipe = METHODS[method].recipe(load_config(DreamBoothConfig, None, overrides))
    recipe.setup()
    if measure_before:  # before training: the full finetune has no adapter to switch off
        recipe.measure_run("before")
    device, stamps = recipe.accelerator.device, [time.perf_counter()]
    reset_peak_memory(device)
    recipe.train(on_step=lambda step, logs: stamps.append(time.perf_counter()))
    peak = peak_memory(device)
    report = recipe.measure_run("after") or {}  # metrics only: no adapter file is needed here
    recipe.accelerator.end_training()
    return {
        "method": method,
        "seed": recipe.cfg.train.seed,
        "learning_rate": recipe.cfg.optim.learning_rate,
        "lora_rank": getattr(recipe, "rank", None),
        "trainable_parameters": recipe.trainable_count(),
        "steps": recipe.step,
        "seconds_per_step": statistics.median(b - a for a, b in zip(stamps, stamps[1:])),
        "peak_memory_bytes": peak,
        "device": str(device),
        "before": recipe.before.metrics if recipe.before is not None else None,
        "after": report.get("after"),
    }


def train_apart(method: str, overrides: list[str], measure_before: bool) -> dict[str, Any]:
    """:func:`train_one` in a fresh process, so that its peak memory and step times are its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train_one, method, overrides, measure_before).result()


# --- the comparison ------------------------------------------------------------------------------
def check_methods(names: list[str]) -> None:
    """Every method is known and has its packages, or a :class:`CommandError` (nothing has run yet)."""
    for name in names:
        if name not in METHODS:
            hint = " (put KEY=VALUE overrides before the options, or after --)" if "=" in name else ""
            raise CommandError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}{hint}")
        package = METHODS[name].package
        if package is not None and importlib.util.find_spec(package) is None:
            raise CommandError(
                f"--methods {name} needs the {package} package, which is not installed: pip install {package} "
                f"(or leave {name} out of --methods)"
            )


def learning_rates(args: argparse.Namespace, config_lr: float) -> dict[str, float]:
    """Each method's learning rate: ``--full-lr``, ``--lora-lr`` (default the config's), the config's."""
    special = {"full": args.full_lr, "lora": args.lora_lr if args.lora_lr is not None else config_lr}
    return {name: special.get(name, config_lr) for name in args.methods}


def spread(values: list[float | None]) -> dict[str, float] | None:
    """Mean, sample standard deviation (0 for one value), lowest and highest of the measured ``values``."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}


def summarise(method: str, runs: list[dict[str, Any]], lr: float) -> dict[str, Any]:
    """One method's row: what every seed shares, and the spread over seeds of what was measured."""
    rank = runs[0]["lora_rank"]
    summary = {
        "label": f"LoRA (PEFT, r={rank})" if method == "lora" else METHODS[method].label,
        "learning_rate": lr,
        "lora_rank": rank,
        "trainable_parameters": runs[0]["trainable_parameters"],
        "seeds": [run["seed"] for run in runs],
    }
    for key in MEASURES:
        summary[key] = spread([(run["after"] or {}).get(key) for run in runs])
    for key in ("seconds_per_step", "peak_memory_bytes"):
        summary[key] = spread([run[key] for run in runs])
    return summary


def cell(stats: dict[str, float] | None, fmt: str = ".3f", scale: float = 1.0) -> str:
    """``mean (min–max)`` over seeds; the value alone for one seed."""
    if stats is None:
        return "n/a"
    mean, low, high = (format(stats[k] / scale, fmt) for k in ("mean", "min", "max"))
    return mean if low == high else f"{mean} ({low}–{high})"


def table(result: dict[str, Any]) -> str:
    """The comparison as a markdown table (mean over seeds, lowest–highest seed in parentheses)."""
    lines = [
        "| method | lr | trainable params | subject fidelity ↑ | prompt fidelity ↑ | class drift ↓ "
        "| s / step | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    before = result["before"] or {}
    values = " | ".join(format(v, ".3f") if v is not None else "n/a" for v in map(before.get, MEASURES))
    lines.append(f"| before (the base model) | – | – | {values} | – | – |")
    for row in result["methods"].values():
        measured = " | ".join(cell(row[key]) for key in MEASURES)
        lines.append(
            f"| {row['label']} | {row['learning_rate']:g} | {row['trainable_parameters']:,d} | {measured} "
            f"| {cell(row['seconds_per_step'])} | {cell(row['peak_memory_bytes'], '.0f', 2**20)} |"
        )
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> int:
    args.methods, args.seeds = list(dict.fromkeys(args.methods)), list(dict.fromkeys(args.seeds))
    check_methods(args.methods)
    base = load_config(DreamBoothConfig, None, args.overrides)  # a bad override fails here
    out = check_new_output(args.out, inputs=DreamBoothRecipe(base).input_paths(), overwrite=args.overwrite)
    steps = args.steps if args.steps is not None else base.train.max_train_steps
    if steps < 1 or not args.seeds:
        raise CommandError("--steps must be >= 1 and --seeds must name at least one seed")
    rates = learning_rates(args, base.optim.learning_rate)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="compare_dreambooth-") as tmp:
        plans = []
        for seed in args.seeds:  # methods interleaved, so that machine noise hits each alike
            for method in args.methods:
                overrides = [
                    f"data.class_data_dir={tmp}/class-images-seed{seed}",  # generated once per seed, shared
                    "train.checkpointing_steps=0", "validation.validation_steps=0", "train.report_to=none",
                    *args.overrides,
                    f"train.output_dir={tmp}/{method}-seed{seed}", f"train.seed={seed}",
                    f"train.max_train_steps={steps}", *METHODS[method].overrides,
                    f"optim.learning_rate={rates[method]}",
                ]  # fmt: skip
                load_config(DreamBoothConfig, None, overrides)  # every run's config checked before any trains
                plans.append((method, seed, overrides))
        for i, (method, seed, overrides) in enumerate(plans):
            print(f"[{i + 1}/{len(plans)}] {method}, seed {seed}", file=sys.stderr)
            runs.append(train_apart(method, overrides, measure_before=i == 0))
            print(f"  {json.dumps({k: v for k, v in runs[-1].items() if k != 'before'})}", file=sys.stderr)
    result = {
        "steps": steps,
        "seeds": args.seeds,
        "overrides": args.overrides,
        "device": runs[0]["device"],
        "spread": "over seeds: mean, std (sample standard deviation), min, max",
        "peak_memory": "of the training phase: CUDA max_memory_allocated, else peak RSS (VmHWM on Linux)",
        "before": runs[0]["before"],
        "methods": {m: summarise(m, [r for r in runs if r["method"] == m], rates[m]) for m in args.methods},
        "runs": runs,
    }
    print(table(result))
    with atomic_file(out, replace=args.overwrite) as path:
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), metavar="METHOD", help=", ".join(METHODS)
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="default: the config's train.max_train_steps")
    parser.add_argument("--full-lr", type=number, default=3e-4, help="learning rate of the full finetune")
    parser.add_argument(
        "--lora-lr", type=number, default=None, help="learning rate of LoRA (default: the config's)"
    )
    parser.add_argument("--out", type=Path, default=Path("compare_dreambooth.json"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides for every run (before the options, or after --)",
    )
    return reports_input_errors(compare)(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
