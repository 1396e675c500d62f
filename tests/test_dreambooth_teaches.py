"""The main job teaches: a shortened DreamBooth run raises subject fidelity far beyond seed noise (slow tier).

The quickstart's recipe and layout, shortened to fit a minute on two CPU cores (about 50 s quiet):
250 steps instead of 500, without prior preservation (no class images to sample, half the batch),
two images per prompt in the before / after measurement, no checkpoints, grids or trackers. Measured
with `boft-diffusion train dreambooth` and these overrides: subject fidelity 0.114 before, 0.338 after
at seed 0 and 0.322 at seed 1 (the full quickstart reaches 0.56-0.62 over seeds 0-2, README "What it
teaches"). Two seeds of the run differ by 0.02, so a rise of at least 0.15 is learning, not noise.
"""

from __future__ import annotations

import json

import pytest

from boft_diffusion.recipes.dreambooth import DreamBoothConfig, run
from boft_diffusion.training.args import load_config

SHORT = [
    "train.max_train_steps=250",
    "data.with_prior_preservation=false",
    "metrics.num_images=2",
    "train.checkpointing_steps=0",
    "validation.validation_steps=0",
    "train.report_to=none",
]


@pytest.mark.slow
def test_a_short_dreambooth_run_teaches_the_subject(tmp_path):
    out = tmp_path / "run"
    run(load_config(DreamBoothConfig, None, [f"train.output_dir={out}", *SHORT]))
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["subject_fidelity"], metrics["after"]["subject_fidelity"]
    assert after - before >= 0.15, (before, after, metrics["per_prompt"]["after"])
    # The subject shows in the contexts too, not only on the bare instance prompt.
    per_prompt = metrics["per_prompt"]["after"]
    taught = [p for p in metrics["probe"]["context_prompts"] if per_prompt[p]["subject_fidelity"] >= 0.3]
    assert len(taught) >= 2, per_prompt
