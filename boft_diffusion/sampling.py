"""Seeded sampling, written once: every image the package samples comes from :func:`seeded_images`.

The seeding rule: **image** ``k`` **starts from its own CPU generator,**
``torch.Generator("cpu").manual_seed(seeds[k])``. A caller asking for ``n`` images of one prompt at
seed ``s`` gives them the seeds ``s, s + 1, ..., s + n - 1`` (:func:`image_seeds`). So an image depends on
its prompt, its seed and the sampler settings only: not on how many images were asked for, how the
calls were batched (up to the float rounding of batched kernels), the device (diffusers draws the
initial noise from a CPU generator on the CPU and moves it) or the global RNG, which is left alone.
Validation grids, the DreamBooth metrics, class images, ``boft-diffusion sample``, ``convert``'s pixel
check and controlled sampling all follow it, so the same prompt and seed give the same image in each.

This module is the ground floor and knows no model family. Which optional arguments
(:data:`OPTIONAL_ARGUMENTS`) a pipeline's call takes is its family's to say
(``boft_diffusion.families.Family.call_arguments``): a caller that knows the family passes that as
``accepted``; for any other pipeline (a stock one of no supported family, a stand-in) its call's signature
says (:func:`accepts`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

__all__ = ["OPTIONAL_ARGUMENTS", "accepts", "image_seeds", "seeded_images"]

OPTIONAL_ARGUMENTS = ("negative_prompt",)
"""Pipeline arguments passed only to pipelines whose call takes them (FLUX.2 [klein] takes no negative
prompt); any other argument a pipeline does not take is an error."""


def accepts(pipe: Any, name: str) -> bool:
    """Whether ``pipe``'s ``__call__`` takes the argument ``name`` (or any keyword argument): what
    :func:`seeded_images` asks when the caller does not say what the pipeline's family accepts. ``pipe`` may
    also be a pipeline class."""
    parameters = inspect.signature(pipe.__call__).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def image_seeds(seed: int, num_images: int) -> list[int]:
    """The seeds of ``num_images`` images of one prompt at ``seed``: ``seed, seed + 1, ...``."""
    return [seed + i for i in range(num_images)]


@torch.no_grad()
def seeded_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    accepted: Collection[str] | None = None,
    **pipe_kwargs: Any,
) -> list[Any]:
    """``pipe(prompt=prompts[k], generator=Generator("cpu").manual_seed(seeds[k]), **pipe_kwargs)`` for every
    ``k``, called in chunks of at most ``batch_size`` images (``None``: all at once); the images in order.

    ``pipe_kwargs`` go to every call (sampler steps, guidance, size, ``output_type``); per-image inputs
    such as a ControlNet's list of control images need one call (``batch_size=None``). Those named in
    :data:`OPTIONAL_ARGUMENTS` are dropped for a pipeline that does not take them: those not in ``accepted``
    (what the pipeline's family says its call takes, ``Family.call_arguments``), or with ``accepted=None``
    those its call's signature lacks (:func:`accepts`). ``on_batch(n)`` is called after each chunk with its
    number of images (progress bars).
    """
    if isinstance(prompts, str):
        raise TypeError("give a sequence of prompts, one per image, not one string")
    if len(prompts) != len(seeds):
        raise ValueError(f"give one seed per prompt (got {len(prompts)} prompts and {len(seeds)} seeds)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    takes = (lambda name: name in accepted) if accepted is not None else (lambda name: accepts(pipe, name))
    kwargs = {k: v for k, v in pipe_kwargs.items() if k not in OPTIONAL_ARGUMENTS or takes(k)}
    step = batch_size or max(1, len(prompts))
    images: list[Any] = []
    for start in range(0, len(prompts), step):
        chunk = range(start, min(start + step, len(prompts)))
        out = pipe(
            prompt=[prompts[k] for k in chunk],
            generator=[torch.Generator("cpu").manual_seed(int(seeds[k])) for k in chunk],
            **kwargs,
        ).images
        images += list(out)
        if on_batch is not None:
            on_batch(len(chunk))
    return images
