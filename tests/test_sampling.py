"""Seeded sampling is written once: validation grids, the DreamBooth metrics, class images, `sample` and
`convert`'s pixel check give the same image for the same prompt and seed (``sampling.seeded_images``)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from boft_diffusion.commands.convert import sample_images as convert_images
from boft_diffusion.commands.sample import _generate
from boft_diffusion.data import generate_class_images
from boft_diffusion.metrics import sample_images as metrics_images
from boft_diffusion.sampling import accepts, image_seeds, seeded_images
from boft_diffusion.training.args import ValidationArgs
from boft_diffusion.training.validation import sample_grid

PROMPT, SEED, STEPS, GUIDANCE, SIZE = "a photo of a red star on a blue background", 5, 4, 7.5, 64
# Batched kernels round differently from single ones: images of one seed may differ by a level or two.
TOLERANCE = 3


def pixels(image) -> np.ndarray:
    array = np.asarray(image)
    return array.astype(np.int16) if array.dtype == np.uint8 else np.round(array * 255).astype(np.int16)


@pytest.fixture(scope="module")
def pipe():
    from boft_diffusion.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_caller_draws_the_same_image_for_the_same_prompt_and_seed(pipe, tmp_path):
    common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE)
    reference = [pixels(im) for im in seeded_images(pipe, [PROMPT] * 2, [SEED, SEED + 1], **common)]
    assert np.abs(reference[0] - reference[1]).max() > 30  # two seeds, two images: the check can fail

    args = ValidationArgs(
        prompts=[PROMPT],
        num_images_per_prompt=2,
        seed=SEED,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
    )
    grid = pixels(sample_grid(pipe, args, SIZE))
    validation = [grid[:, :SIZE], grid[:, SIZE : 2 * SIZE]]

    drawn = metrics_images(pipe, [PROMPT], 2, seed=SEED, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    metrics = [pixels(im) for im in drawn[0]]

    generate_class_images(
        pipe, tmp_path, PROMPT, 2, batch_size=2, num_inference_steps=STEPS, resolution=SIZE, seed=SEED
    )
    classes = [
        pixels(_open(tmp_path / f"class_{k:05d}.png")) for k in range(2)
    ]  # guidance: the pipeline's 7.5

    cli = argparse.Namespace(
        prompt=PROMPT, negative_prompt=None, num_images=2, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE,
        height=SIZE, width=SIZE,
    )  # fmt: skip
    sampled = [pixels(im) for im in _generate(pipe, cli)]
    converted = list(pixels(convert_images(pipe, [PROMPT] * 2, SEED, STEPS, SIZE)))

    for name, images in {
        "validation": validation, "metrics": metrics, "class images": classes, "sample": sampled,
        "convert": converted,
    }.items():  # fmt: skip
        for k, image in enumerate(images):
            diff = int(np.abs(image - reference[k]).max())
            assert diff <= TOLERANCE, f"{name} image {k} (seed {SEED + k}) differs by {diff} levels"


def _open(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").copy()


def test_an_image_does_not_depend_on_batching_or_on_the_global_rng(pipe):
    common = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np")
    together = seeded_images(pipe, [PROMPT] * 3, image_seeds(SEED, 3), **common)
    torch.manual_seed(1234)
    alone = seeded_images(pipe, [PROMPT], [SEED + 2], **common)
    state = torch.get_rng_state()
    one_by_one = seeded_images(pipe, [PROMPT] * 3, image_seeds(SEED, 3), batch_size=1, **common)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert np.abs(together[2] - alone[0]).max() * 255 <= TOLERANCE
    assert all(np.abs(a - b).max() * 255 <= TOLERANCE for a, b in zip(together, one_by_one))


def test_optional_arguments_go_only_to_pipelines_that_take_them(pipe):
    calls = []

    class NoNegative:
        def __call__(self, prompt, generator, num_inference_steps):
            calls.append((prompt, [g.initial_seed() for g in generator], num_inference_steps))
            return argparse.Namespace(images=[f"image of {p}" for p in prompt])

    fake = NoNegative()
    assert accepts(pipe, "negative_prompt") and not accepts(fake, "negative_prompt")
    images = seeded_images(
        fake, ["a", "b", "c"], [7, 8, 9], batch_size=2, negative_prompt="x", num_inference_steps=3
    )
    assert images == ["image of a", "image of b", "image of c"]
    assert calls == [(["a", "b"], [7, 8], 3), (["c"], [9], 3)]
    with pytest.raises(TypeError):  # any other argument it does not take is the caller's error
        seeded_images(fake, ["a"], [1], guidance_scale=2.0, num_inference_steps=3)


def test_a_caller_that_knows_the_family_says_which_optional_arguments_the_call_takes():
    """``accepted`` (the family's ``call_arguments``) decides instead of the call's signature."""
    calls = []

    class AnyKeyword:
        def __call__(self, prompt, generator, **kwargs):
            calls.append(kwargs)
            return argparse.Namespace(images=list(prompt))

    seeded_images(AnyKeyword(), ["a"], [1], accepted=(), negative_prompt="x", num_inference_steps=3)
    assert calls[-1] == {
        "num_inference_steps": 3
    }  # its family takes none: dropped though **kwargs would take it
    seeded_images(AnyKeyword(), ["a"], [1], accepted=("negative_prompt",), negative_prompt="x")
    assert calls[-1] == {"negative_prompt": "x"}


def test_mismatched_seeds_or_a_lone_string_are_refused():
    with pytest.raises(ValueError, match="one seed per prompt"):
        seeded_images(None, ["a", "b"], [1])
    with pytest.raises(TypeError, match="not one string"):
        seeded_images(None, "a photo", [1])
    with pytest.raises(ValueError, match="batch_size"):
        seeded_images(None, ["a"], [1], batch_size=0)
