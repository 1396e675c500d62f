"""Shared fixtures: the tiny offline pipeline and reference helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


DREAMBOOTH_FAST = [
    "train.max_train_steps=2",
    "train.train_batch_size=1",
    "boft.block_size=0",  # the small layout the tests vary: 4 blocks, 2 factors (block_size off)
    "boft.block_num=4",
    "boft.n_butterfly_factor=2",
    "boft.text_encoder_target_modules=[q_proj,k_proj,v_proj,out_proj]",  # every CLIP attention projection
    "train.checkpointing_steps=0",
    "train.report_to=none",
    "metrics.scorer=none",
    "data.with_prior_preservation=false",
    "validation.validation_steps=0",
    "validation.prompts=[a photo of sks toy]",
    "validation.num_images_per_prompt=1",
    "validation.num_inference_steps=2",
    "data.num_generated_images=2",
]
"""Overrides that make a DreamBooth run take seconds: tests add theirs after these (later ones win)."""

FAMILY_FAST = [
    "train.max_train_steps=2",
    "train.checkpointing_steps=0",
    "validation.validation_steps=0",
    "validation.num_inference_steps=2",
    "validation.num_images_per_prompt=1",
    "data.num_generated_images=2",
    "data.with_prior_preservation=false",
    "metrics.scorer=none",
    "train.report_to=none",
]
"""Overrides that make a DreamBooth run on any model family take seconds with the recipe's own BOFT
layout (DREAMBOOTH_FAST also pins a small layout); tests add theirs after these."""


def recipe_config(cls, out, *overrides: str):
    """A recipe's config writing to ``out``, with dotted ``overrides`` (later ones win), as the CLI loads it."""
    from boft_diffusion.training.args import load_config

    return load_config(cls, None, [f"train.output_dir={out}", *overrides])


class Stop(Exception):
    """Raised by :func:`stop_at` to kill a run after a step (as Ctrl-C or kill -9 would, minus the signal)."""


def stop_at(step: int):
    """An ``on_step`` callback that stops the run once ``step`` steps are done."""

    def on_step(done: int, logs: dict) -> None:
        if done == step:
            raise Stop

    return on_step


@pytest.fixture
def tiny_pipe():
    """A fresh tiny StableDiffusionPipeline (built offline in well under a second)."""
    from boft_diffusion.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(pipe, prompt: str = "a photo of sks toy", seed: int = 0, steps: int = 3):
    """Deterministic images as a float numpy array (N, H, W, 3)."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt, num_inference_steps=steps, generator=generator, output_type="np", height=32, width=32
    ).images
