"""Validation: sample fixed prompts with fixed seeds into a PNG grid (one row per prompt).

Sampling runs on the main process only, with the global RNG state saved and restored around it,
so validating never changes what training draws next (a resumed run matches an uninterrupted one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.utils import make_image_grid
from PIL import Image
from torch import nn

from ..atomic import atomic_file
from ..sampling import image_seeds, seeded_images
from .args import ValidationArgs
from .sharding import samples_on_every_process
from .tracking import log_images

__all__ = ["run_validation", "sample_grid", "sampling_context"]


def _image_format(path: Path) -> str:
    """PIL's format name for ``path``'s extension (the temporary file's name does not tell); PNG if unknown."""
    return Image.registered_extensions().get(path.suffix.lower(), "PNG")


@torch.no_grad()
def sample_grid(pipe: Any, args: ValidationArgs, resolution: int, **pipe_kwargs: Any) -> Image.Image:
    """Sample ``args.num_images_per_prompt`` images per prompt (image ``j`` from seed ``args.seed + j``,
    :func:`~boft_diffusion.sampling.seeded_images`), one call per prompt."""
    size = args.resolution or resolution
    n = args.num_images_per_prompt
    images = []
    for prompt in args.prompts:
        images += seeded_images(
            pipe,
            [prompt] * n,
            image_seeds(args.seed, n),
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            height=size,
            width=size,
            **pipe_kwargs,
        )
    return make_image_grid(images, len(args.prompts), n)


def sampling_context(accelerator: Accelerator) -> Any:
    """Autocast as training runs it, so a pipeline whose frozen parts were cast to bf16 / fp16 samples
    with float32 trained parts (the UNet's float32 latents meet a bf16 VAE); no-op in full precision."""
    return accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()


def run_validation(
    accelerator: Accelerator,
    pipe: Any,
    args: ValidationArgs,
    resolution: int,
    out_file: Path,
    step: int,
    trained: Sequence[nn.Module] = (),
    tag: str = "validation",
    make_grid: Callable[[], Image.Image] | None = None,
    **pipe_kwargs: Any,
) -> Path | None:
    """Sample a grid into ``out_file`` and the trackers (main process); every process must call this.

    Sharded runs (FSDP) sample on every process in lockstep (each forward gathers parameters from all of
    them); the main process alone writes and logs the grid.

    ``trained`` modules are switched to eval mode (no dropout) while sampling and back afterwards.
    ``make_grid`` replaces the prompt grid (a recipe's own rows, e.g. control image | samples).
    """
    if not args.prompts and make_grid is None:
        return None
    if accelerator.is_main_process or samples_on_every_process(accelerator):
        modes = [m.training for m in trained]
        for module in trained:
            module.eval()
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), sampling_context(accelerator):
            grid = (
                make_grid() if make_grid is not None else sample_grid(pipe, args, resolution, **pipe_kwargs)
            )
        for module, mode in zip(trained, modes):
            module.train(mode)
    if accelerator.is_main_process:
        with atomic_file(out_file) as tmp:  # a killed run leaves no half grid
            grid.save(tmp, format=_image_format(out_file))
        log_images(accelerator, tag, grid, step, caption=" | ".join(args.prompts) or tag)
    accelerator.wait_for_everyone()
    return out_file
