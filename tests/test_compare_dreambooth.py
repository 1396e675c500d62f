"""scripts/compare_dreambooth.py: bad input is refused before anything trains; the methods train what they
say at matched budgets; a short run writes the comparison."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from boft_diffusion.inject import count_parameters
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, DreamBoothRecipe
from boft_diffusion.training.args import load_config
from boft_diffusion.training.setup import load_pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_dreambooth.py"

SMALL = [
    "metrics.num_images=1",
    "metrics.num_inference_steps=2",
    "metrics.context_prompts=[a photo of sks toy on an orange background]",
    "data.num_generated_images=2",
    "data.num_class_images=1",
    "data.class_inference_steps=1",
]
"""Overrides that make each run of the comparison take seconds (prior preservation kept, one class image)."""


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_dreambooth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "lora"], "needs the peft package, which is not installed: pip install peft"),
        (["--methods", "boft-m2", "dora"], "unknown method 'dora'"),
        (["--methods", "boft-m2", "metrics.num_images=1"], "put KEY=VALUE overrides before the options"),
        (["boft.no_such_key=1", "--methods", "boft-m2"], "boft.no_such_key"),
        (["--methods", "boft-m2", "--out", "existing.json"], "already exists"),
        (["--methods", "boft-m2", "--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_input_is_one_line_before_anything_trains(compare, argv, message, tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a)
    )
    monkeypatch.setattr(compare, "train_apart", lambda *a, **k: pytest.fail("a run started"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing.json").write_text("kept\n")
    assert compare.main(argv if "--out" in argv else [*argv, "--out", "new.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.json"]
    assert (tmp_path / "existing.json").read_text() == "kept\n"


@pytest.fixture(scope="module")
def world_pipe():
    """The embedded default's pipeline (the tiny world model), frozen as the recipe's setup leaves it."""
    pipe = load_pipeline(load_config(DreamBoothConfig).model)
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).requires_grad_(False)
    return pipe


def test_methods_train_what_they_say_at_matched_budgets(compare, world_pipe):
    """Full: every UNet parameter, nothing of the text encoder; LoRA: only its factors, on exactly the
    layers BOFT (m=2, b=8) adapts, with about as many parameters as BOFT trains there."""

    def trained(recipe_class, method):
        cfg = load_config(DreamBoothConfig, None, list(compare.METHODS[method].overrides))
        recipe = recipe_class(cfg)
        recipe.pipe = copy.deepcopy(world_pipe)
        return recipe, recipe._add_adapters()

    _, full = trained(compare.FullDreamBoothRecipe, "full")
    assert list(full) == ["unet"]
    assert count_parameters(full["unet"])[0] == count_parameters(full["unet"])[1]
    boft_recipe, boft = trained(DreamBoothRecipe, "boft-m2")
    lora_recipe, lora = trained(compare.LoRADreamBoothRecipe, "lora")
    assert list(lora) == list(boft) == ["unet", "text_encoder"]
    n_boft = sum(count_parameters(m)[0] for m in boft.values())
    n_lora = sum(count_parameters(m)[0] for m in lora.values())
    assert abs(n_lora - n_boft) <= 0.3 * n_boft and lora_recipe.rank >= 1
    assert count_parameters(full["unet"])[0] > 5 * n_boft
    for name, model in lora.items():
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all(".lora_" in n for n in names)
        adapted = {n.split(".lora_")[0] for n in names}
        assert adapted == set(boft_recipe._plan_adapters()[name].targets)


@pytest.mark.slow
def test_short_comparison_writes_the_table_and_json(tmp_path):
    out = tmp_path / "compare.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *SMALL, "--methods", "full", "boft-m2", "--seeds", "0", "--steps", "2",
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the runs' outputs were temporary
    data = json.loads(out.read_text())
    assert data["steps"] == 2 and data["seeds"] == [0] and data["overrides"] == SMALL
    measures = ("subject_fidelity", "prompt_fidelity", "class_drift")
    assert set(data["before"]) == set(measures)
    assert list(data["methods"]) == ["full", "boft-m2"]
    full, boft = data["methods"]["full"], data["methods"]["boft-m2"]
    assert (full["learning_rate"], boft["learning_rate"]) == (3e-4, 2e-3)
    assert full["trainable_parameters"] > 5 * boft["trainable_parameters"] > 0
    for row in (full, boft):
        for key in (*measures, "seconds_per_step", "peak_memory_bytes"):
            stats = row[key]
            assert (
                set(stats) == {"mean", "std", "min", "max"} and stats["min"] <= stats["mean"] <= stats["max"]
            )
        assert row["seconds_per_step"]["mean"] > 0 and row["peak_memory_bytes"]["mean"] > 0
    assert [(r["method"], r["seed"], r["steps"]) for r in data["runs"]] == [("full", 0, 2), ("boft-m2", 0, 2)]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| method |") and lines[2].startswith("| before (the base model) |")
    assert lines[3].startswith("| full finetune (UNet) | 0.0003 |") and lines[4].startswith(
        "| BOFT (m=2, b=8) |"
    )
