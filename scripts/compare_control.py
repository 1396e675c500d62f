#!/usr/bin/env python
"""OFT against BOFT on controllable generation, at matched parameter budgets (the BOFT paper's Table 6, in small).

    python scripts/compare_control.py [--steps 500] [--out compare_control.json] [KEY=VALUE ...]

Trains the embedded default of ``boft-diffusion train controlnet`` (a ControlNet on the tiny world's
edge maps) once per method, with the same data, steps, learning rate and seeds, and prints a table
of control fidelity (edge F1, mask IoU on held-out scenes) against trainable parameters and
training-step time. The budgets are matched as the paper matches them: a layer of width d holds
m * d * (b - 1) / 2 rotation parameters, so OFT (m = 1, b = 16), BOFT (m = 2, b = 8) and BOFT
(m = 4, b = 4) train about the same number (15 : 14 : 12 per d/2). KEY=VALUE overrides go to every
run (e.g. ``control.mode=light``). Step time is wall-clock on this machine, one run after another:
compare it within one invocation only.

LoRA (through PEFT) is not in the table yet: the recipe trains BOFT adapters only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from boft_diffusion.recipes.controlnet import ControlNetConfig, ControlNetRecipe
from boft_diffusion.training.args import load_config

METHODS = {
    "OFT (m=1, b=16)": ["boft.n_butterfly_factor=1", "boft.block_size=16", "boft.block_num=0"],
    "BOFT (m=2, b=8)": ["boft.n_butterfly_factor=2", "boft.block_size=8", "boft.block_num=0"],
    "BOFT (m=4, b=4)": ["boft.n_butterfly_factor=4", "boft.block_size=4", "boft.block_num=0"],
}


def train_one(name: str, overrides: list[str], folder: Path) -> dict:
    config = load_config(ControlNetConfig, None, [f"train.output_dir={folder}", *overrides])
    recipe = ControlNetRecipe(config)
    recipe.setup()
    recipe.measure_run("before")
    start = time.perf_counter()
    recipe.train()
    seconds = time.perf_counter() - start
    recipe.save()
    recipe.accelerator.end_training()
    report = recipe.report or {}
    return {
        "method": name,
        "trainable_parameters": recipe.trainable_count(),
        "seconds_per_step": seconds / max(1, recipe.step),
        "before": report.get("before"),
        "after": report.get("after"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    common = [
        f"train.max_train_steps={args.steps}", "train.checkpointing_steps=0", "validation.validation_steps=0",
        "train.report_to=none", *args.overrides,
    ]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, method) in enumerate(METHODS.items()):
            rows.append(train_one(name, [*common, *method], Path(tmp) / f"run{i}"))
    print("| method | trainable parameters | s / step | edge F1 before -> after | mask IoU before -> after |")
    print("|---|---|---|---|---|")
    for row in rows:
        b, a = row["before"] or {}, row["after"] or {}
        print(
            f"| {row['method']} | {row['trainable_parameters']:,d} | {row['seconds_per_step']:.3f} | "
            f"{b.get('control_edge_f1', float('nan')):.3f} -> {a.get('control_edge_f1', float('nan')):.3f} | "
            f"{b.get('control_mask_iou', float('nan')):.3f} -> {a.get('control_mask_iou', float('nan')):.3f} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
