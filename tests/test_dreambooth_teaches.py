"""The main job teaches: the quickstart's DreamBooth raises subject fidelity far beyond seed noise (slow tier).

This is `boft-diffusion train dreambooth` as the README runs it, without checkpoints, validation
grids or trackers: about two minutes on two CPU cores. That is more than the minute the issue asked
for. Shorter runs (250 or 400 steps, with or without prior preservation, two images per prompt)
rose by only 0.1 or fell, within the noise of a two-image measurement, so they could not show
learning. At full length, seeds 0, 1 and 2 end at 0.64, 0.47 and 0.63 from 0.07 before (README,
"What it teaches"), so a rise of at least 0.25 is learning.
"""

from __future__ import annotations

import json

import pytest

from boft_diffusion.recipes.dreambooth import DreamBoothConfig, run
from boft_diffusion.training.args import load_config

SHORT = ["train.checkpointing_steps=0", "validation.validation_steps=0", "train.report_to=none"]


@pytest.mark.slow
def test_a_short_dreambooth_run_teaches_the_subject(tmp_path):
    out = tmp_path / "run"
    run(load_config(DreamBoothConfig, None, [f"train.output_dir={out}", *SHORT]))
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["subject_fidelity"], metrics["after"]["subject_fidelity"]
    assert after - before >= 0.25, (before, after, metrics["per_prompt"]["after"])
    # Not bought with the class: samples of "a photo of a toy" still rarely show the subject.
    assert metrics["after"]["class_drift"] <= 0.25, metrics["after"]
