#!/usr/bin/env python
"""LoRA, OFT and BOFT on controllable generation at matched parameter budgets (the BOFT paper's Table 6, in small).

    python scripts/compare_control.py [--steps 500] [--out compare_control.json] [KEY=VALUE ...]

Trains the embedded default of ``boft-diffusion train controlnet`` (a ControlNet on the tiny world's
edge maps) once per method, with the same data, steps, learning rate and seeds, and prints a table
of control fidelity (edge F1, mask IoU on held-out scenes) against trainable parameters and
training-step time. The budgets are matched as the paper matches them: a layer of width d holds
m * d * (b - 1) / 2 rotation parameters, so OFT (m = 1, b = 16), BOFT (m = 2, b = 8) and BOFT
(m = 4, b = 4) train about the same number (15 : 14 : 12 per d/2). LoRA goes through PEFT
(``inject_adapter_in_model``) on the same ControlNet projections, at the rank whose adapter holds
about as many parameters as BOFT (m = 2, b = 8); it is the same recipe, loop and data with only the
adapter swapped (:class:`LoRAControlNetRecipe`). The condition embedding and zero convolutions train
in full in every row, so "adapter parameters" (the column that is matched) is given beside the total.
KEY=VALUE overrides go to every run. Step time is wall-clock on this machine, one run after another:
compare it within one invocation only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from torch import nn

from boft_diffusion.benchmark import lora_rank_for
from boft_diffusion.inject import count_parameters
from boft_diffusion.recipes.controlnet import ControlNetConfig, ControlNetRecipe, controlnet_saved_modules
from boft_diffusion.training.args import load_config

LORA = "LoRA (PEFT)"

METHODS = {
    "OFT (m=1, b=16)": ["boft.n_butterfly_factor=1", "boft.block_size=16", "boft.block_num=0"],
    "BOFT (m=2, b=8)": ["boft.n_butterfly_factor=2", "boft.block_size=8", "boft.block_num=0"],
    "BOFT (m=4, b=4)": ["boft.n_butterfly_factor=4", "boft.block_size=4", "boft.block_num=0"],
}


class LoRAControlNetRecipe(ControlNetRecipe):
    """The controlnet recipe with PEFT LoRA on the ControlNet projections instead of BOFT, at the rank whose
    factors hold closest to ``budget`` parameters.

    Only the adapter differs: data, loss, loop, measurement and the fully trained condition embedding
    and zero convolutions are the recipe's. For this comparison only (its ``save`` is not used: the
    project's adapter file holds BOFT adapters).
    """

    def __init__(self, cfg: ControlNetConfig, budget: int) -> None:
        super().__init__(cfg)
        self.budget = budget
        self.rank = 0

    def _add_adapters(self) -> dict[str, nn.Module]:
        from peft import LoraConfig, inject_adapter_in_model

        c = self.cfg.control
        if c.mode != "controlnet" or c.train_unet:
            raise SystemExit(
                "the LoRA row compares ControlNet adapters: control.mode=controlnet, train_unet=false"
            )
        controlnet, targets = self.controlnet, list(self.cfg.boft.controlnet_target_modules)
        adapted = [  # the layers PEFT's target_modules will pick: a name equal to or ending in a target
            m for name, m in controlnet.named_modules()
            if isinstance(m, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
        ]  # fmt: skip
        self.rank = lora_rank_for(adapted, self.budget)
        config = LoraConfig(
            r=self.rank, lora_alpha=self.rank, init_lora_weights="gaussian",
            target_modules=targets,
        )  # fmt: skip
        inject_adapter_in_model(config, controlnet)  # freezes everything but the LoRA factors
        for name in controlnet_saved_modules(controlnet):
            controlnet.get_submodule(name).requires_grad_(True)
        controlnet.to(self.accelerator.device)
        if self.cfg.train.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        self.pipe.controlnet = controlnet
        return {"controlnet": controlnet}


def fully_trained(recipe: ControlNetRecipe) -> int:
    """Parameters of the condition embedding and zero convolutions (trained in full in every row; the
    trainable count, since BOFT keeps a frozen original beside each trained copy)."""
    modules = [recipe.controlnet.get_submodule(name) for name in controlnet_saved_modules(recipe.controlnet)]
    return sum(count_parameters(module)[0] for module in modules)


def train_one(name: str, overrides: list[str], folder: Path, lora_budget: int | None = None) -> dict:
    config = load_config(ControlNetConfig, None, [f"train.output_dir={folder}", *overrides])
    recipe = ControlNetRecipe(config) if lora_budget is None else LoRAControlNetRecipe(config, lora_budget)
    recipe.setup()
    recipe.measure_run("before")
    start = time.perf_counter()
    recipe.train()
    seconds = time.perf_counter() - start
    report = recipe.measure_run("after") or {}  # metrics only: no adapter file is needed here
    recipe.accelerator.end_training()
    total = recipe.trainable_count()
    return {
        "method": f"{name} r={recipe.rank}" if isinstance(recipe, LoRAControlNetRecipe) else name,
        "trainable_parameters": total,
        "adapter_parameters": total - fully_trained(recipe),
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
        budget = next(r["adapter_parameters"] for r in rows if r["method"] == "BOFT (m=2, b=8)")
        rows.insert(0, train_one(LORA, common, Path(tmp) / "lora", lora_budget=budget))
    print(
        "| method | adapter parameters | trainable in all | s / step | edge F1 before -> after "
        "| mask IoU before -> after |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        b, a = row["before"] or {}, row["after"] or {}
        print(
            f"| {row['method']} | {row['adapter_parameters']:,d} | {row['trainable_parameters']:,d} | "
            f"{row['seconds_per_step']:.3f} | "
            f"{b.get('control_edge_f1', float('nan')):.3f} -> {a.get('control_edge_f1', float('nan')):.3f} | "
            f"{b.get('control_mask_iou', float('nan')):.3f} -> {a.get('control_mask_iou', float('nan')):.3f} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
