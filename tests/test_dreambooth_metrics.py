"""DreamBooth measures itself: metrics.json, model card, trackers; bad metric settings fail before writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DREAMBOOTH_FAST, recipe_config

from boft_diffusion.recipes.dreambooth import DreamBoothConfig, run
from boft_diffusion.training.args import ConfigError

FAST = [*DREAMBOOTH_FAST, "metrics.scorer=auto", "metrics.num_images=1", "metrics.num_inference_steps=2"]


def make_config(out: Path, *overrides: str) -> DreamBoothConfig:
    return recipe_config(DreamBoothConfig, out, *FAST, *overrides)


def test_run_writes_metrics_before_and_after(tmp_path, capsys):
    out = tmp_path / "run"
    run(make_config(out))
    report = json.loads((out / "metrics.json").read_text())
    assert report["scorer"] == "world" and report["step"] == 2
    assert report["base_model"] == "boft_diffusion.tiny (world)"
    for stage in ("before", "after"):
        assert set(report[stage]) == {"subject_fidelity", "prompt_fidelity", "class_drift"}
        assert all(0.0 <= v <= 1.0 for v in report[stage].values())
    assert report["probe"]["class_prompt"] == "a photo of a toy"
    probe = report["probe"]
    for stage in ("before", "after"):  # each prompt's own values; subject fidelity is their mean
        per_prompt = report["per_prompt"][stage]
        subject_prompts = [probe["instance_prompt"], *probe["context_prompts"]]
        assert list(per_prompt) == [*subject_prompts, probe["class_prompt"]]
        assert per_prompt[probe["class_prompt"]] == {"class_drift": report[stage]["class_drift"]}
        mean = sum(per_prompt[p]["subject_fidelity"] for p in subject_prompts) / len(subject_prompts)
        assert report[stage]["subject_fidelity"] == pytest.approx(mean)
        assert all(
            set(per_prompt[p]) == {"subject_fidelity", "prompt_fidelity"} for p in probe["context_prompts"]
        )
    assert (out / "metrics.png").is_file()
    card = (out / "README.md").read_text()
    assert "## What it learned" in card and "| subject_fidelity |" in card
    assert "subject_fidelity" in capsys.readouterr().out  # printed at the end
    manifest = json.loads((out / ".boft_diffusion_manifest.json").read_text())
    assert {"metrics.json", "metrics.png"} <= set(manifest["outputs"])


def test_metrics_reach_the_tracker(tmp_path):
    out = tmp_path / "run"
    run(make_config(out, "train.report_to=tensorboard"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in (out / "logs").rglob("events.out.tfevents*")]
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"metrics/subject_fidelity", "metrics/subject_fidelity_before", "metrics/class_drift"} <= tags


def test_metrics_off_writes_none(tmp_path):
    out = tmp_path / "run"
    run(make_config(out, "metrics.scorer=none"))
    assert not (out / "metrics.json").exists()
    assert "What it learned" not in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("metrics.scorer=clip:/does/not/exist", "does not exist"),
        ("metrics.scorer=dino", "scorer"),
        ("metrics.context_prompts=[]", "metrics.context_prompts"),
        ("metrics.context_prompts=[a photo of sks toy at the beach]", "states no context"),
        ("metrics.num_images=0", "metrics.num_images"),
    ],
)
def test_bad_metric_settings_fail_before_anything_is_written(tmp_path, override, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        run(make_config(out, override))
    assert not out.exists()


def test_scorer_weights_that_do_not_fit(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=str(folder)):
        run(make_config(out, f"metrics.scorer=clip:{folder}"))
    assert not out.exists()
