"""Each prompt's own before / after values reach the model card and the end-of-run printout (no training:
a fabricated measurement goes through the recipe's own metrics.json writer)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from PIL import Image

from boft_diffusion.metrics import Measurement, before_after_rows
from boft_diffusion.training.card import write_model_card
from boft_diffusion.training.recipe import TrainingRecipe

INSTANCE, CONTEXT, CLASS = "a photo of sks toy", "a sks toy on the beach", "a photo of a toy"
SUMMARY = {"subject_fidelity": 0.0, "prompt_fidelity": 0.0, "class_drift": 0.0}


def measurement(subject: float, context_subject: float, obeyed: float, drift: float) -> Measurement:
    samples = {p: [Image.new("RGB", (4, 4))] for p in (INSTANCE, CLASS, CONTEXT)}
    per_prompt = {
        INSTANCE: {"subject_fidelity": subject},
        CONTEXT: {"subject_fidelity": context_subject, "prompt_fidelity": obeyed},
        CLASS: {"class_drift": drift},
    }
    metrics = {
        "subject_fidelity": (subject + context_subject) / 2,
        "prompt_fidelity": obeyed,
        "class_drift": drift,
    }
    return Measurement(metrics=metrics, samples=samples, per_prompt=per_prompt)


def stub_recipe(tmp_path, printed: list[str], before: Measurement | None):
    """What ``_write_metrics`` and ``run_all`` use of a recipe, without a model."""
    accelerator = SimpleNamespace(log=lambda *a, **k: None, print=printed.append, end_training=lambda: None)
    recipe = SimpleNamespace(
        cfg=SimpleNamespace(train=SimpleNamespace(output_dir=str(tmp_path))),
        before=before, step=3, base_model="tiny", accelerator=accelerator,
        measure_info=lambda: {"scorer": "world"},
        metrics_rows=before_after_rows,
        setup=lambda: None, trainable_count=lambda: 10, plan=SimpleNamespace(max_train_steps=3),
        measure_run=lambda stage: None, train=lambda on_step: [0.5], save=lambda: None,
    )  # fmt: skip
    return recipe


def report_of(
    tmp_path, printed: list[str], before: Measurement | None = None
) -> tuple[dict, SimpleNamespace]:
    before = measurement(0.125, 0.25, 0.75, 0.0) if before is None else before
    recipe = stub_recipe(tmp_path, printed, before)
    recipe.report = TrainingRecipe._write_metrics(recipe, measurement(0.5, 0.375, 0.625, 0.2))
    assert json.loads((tmp_path / "metrics.json").read_text())["per_prompt"] == recipe.report["per_prompt"]
    return recipe.report, recipe


def card_of(tmp_path, report: dict) -> str:
    return write_model_card(
        tmp_path, title="t", base_model="tiny", description="d", hyperparameters={"boft.block_size": 4},
        trainable_parameters=10, usage="pass", metrics=report,
    ).read_text()  # fmt: skip


def test_card_lists_each_prompt_before_and_after(tmp_path):
    report, _ = report_of(tmp_path, [])
    card = card_of(tmp_path, report)
    lines = card.splitlines()
    summary = lines.index("| class_drift | 0.000 | 0.200 |")
    section = lines.index("### Per prompt")
    assert summary < section < lines.index("## Use it")
    assert "| prompt | subject_fidelity | prompt_fidelity | class_drift |" in lines
    assert f"| {INSTANCE} | 0.125 → 0.500 |  |  |" in lines
    assert f"| {CONTEXT} | 0.250 → 0.375 | 0.750 → 0.625 |  |" in lines
    assert f"| {CLASS} |  |  | 0.000 → 0.200 |" in lines


def test_card_per_prompt_without_before_or_text_scorer(tmp_path):
    report = {
        "scorer": "world",
        "before": None,
        "after": SUMMARY,
        "per_prompt": {
            "before": None,
            "after": {"a | b": {"subject_fidelity": 0.5, "prompt_fidelity": None}},
        },
    }
    lines = card_of(tmp_path, report).splitlines()
    assert "| a \\| b | - → 0.500 | - → - |" in lines  # a prompt's pipe does not split the table


def test_card_without_per_prompt_is_unchanged(tmp_path):
    """The ControlNet recipe's report has no per_prompt: its card has no per-prompt section."""
    report = {"scorer": "edges", "before": None, "after": {"control_edge_f1": 0.5}}
    card = card_of(tmp_path, report)
    assert "| control_edge_f1 | - | 0.500 |" in card
    assert "Per prompt" not in card and "\n\n\n## Use it" not in card


def test_run_prints_each_prompt_after_the_summary(tmp_path):
    printed: list[str] = []
    _, recipe = report_of(tmp_path, printed)
    TrainingRecipe.run_all(recipe)
    table = next(text for text in printed if text.startswith("What it taught")).splitlines()
    assert table[1].split() == ["metric", "before", "after"]
    assert table[2].split() == ["subject_fidelity", "0.188", "0.438"]
    assert table[4].split() == ["class_drift", "0.000", "0.200"]
    assert table[5] == "  per prompt:"
    rows = [line.split(maxsplit=3) for line in table[6:]]
    assert rows == [
        ["subject_fidelity", "0.125", "0.500", INSTANCE],
        ["subject_fidelity", "0.250", "0.375", CONTEXT],
        ["prompt_fidelity", "0.750", "0.625", CONTEXT],
        ["class_drift", "0.000", "0.200", CLASS],
    ]


def test_run_without_per_prompt_prints_the_summary_only(tmp_path):
    printed: list[str] = []
    recipe = stub_recipe(tmp_path, printed, None)
    recipe.report = {"scorer": "edges", "before": None, "after": {"control_edge_f1": 0.5}}
    TrainingRecipe.run_all(recipe)
    table = next(text for text in printed if text.startswith("What it taught")).splitlines()
    assert len(table) == 3 and table[2].split() == ["control_edge_f1", "-", "0.500"]
