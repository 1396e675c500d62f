"""DreamBooth data: instance and class images with their prompts, batches, the epoch sampler and
class-image generation."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from ..atomic import atomic_file
from ..sampling import seeded_images
from .images import (
    DataError,
    image_and_mask_to_tensors,
    image_to_tensor,
    list_images,
    load_mask,
    read_caption,
)


class DreamBoothDataset(Dataset):
    """Instance images with their prompts, optionally paired with class images (prior preservation).

    Item ``i`` holds ``instance_pixel_values`` ``(3, R, R)``, with ``masks`` its loss mask
    ``instance_mask`` ``(1, R, R)`` in ``[0, 1]`` (``alpha``: the image's alpha channel; ``files``: the file
    of its stem in ``mask_dir``), and ``instance_prompt`` (the image's
    caption file, else ``instance_prompt``); with class images also ``class_pixel_values`` and
    ``class_prompt`` (the class image's caption file, else ``class_prompt``: a regularisation set may
    caption its images, e.g. the class in the contexts the subject should keep). The length is the
    larger of the two sets; the smaller one cycles. With ``sizes`` (aspect-ratio buckets) item ``i`` is
    ``(3, h, w)`` at its instance image's bucket, its class image fitted to the same size.
    """

    def __init__(
        self,
        instance_images: Sequence[Path],
        instance_prompt: str,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        class_images: Sequence[Path] | None = None,
        class_prompt: str | None = None,
        caption_extension: str = ".txt",
        seed: int = 0,
        masks: Literal["none", "alpha", "files"] = "none",
        mask_dir: Path | None = None,
        latents: Mapping[tuple[Path, tuple[int, int]], torch.Tensor] | None = None,
        sizes: Mapping[Path, tuple[int, int]] | None = None,
    ) -> None:
        if not instance_images:
            raise DataError("DreamBoothDataset needs at least one instance image")
        if class_images and not class_prompt:
            raise DataError("Class images need a class prompt")
        self.instance_images = list(instance_images)
        self.prompts = [read_caption(p, caption_extension) or instance_prompt for p in self.instance_images]
        self.class_images = list(class_images or [])
        self.class_prompt = class_prompt
        self.class_prompts = [read_caption(p, caption_extension) or class_prompt for p in self.class_images]
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.masks, self.mask_dir = masks, mask_dir
        self.latents = latents
        self.sizes = sizes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def size_at(self, index: int) -> tuple[int, int]:
        """(width, height) item ``index`` trains at: its instance image's bucket (``sizes``), else square."""
        if self.sizes is None:
            return (self.resolution, self.resolution)
        return self.sizes[self.instance_images[index % len(self.instance_images)]]

    def pairs(self) -> list[tuple[Path, tuple[int, int]]]:
        """Every (image, size) an epoch loads: what a latent cache must hold."""
        out = []
        for index in range(len(self)):
            size = self.size_at(index)
            out.append((self.instance_images[index % len(self.instance_images)], size))
            if self.class_images:
                out.append((self.class_images[index % len(self.class_images)], size))
        return list(dict.fromkeys(out))

    def _load(self, path: Path, role: str, index: int) -> torch.Tensor:
        rng = random.Random(f"{self.seed}/{self.epoch}/{role}/{index}")
        flip = self.random_flip and rng.random() < 0.5
        size = self.size_at(index) if self.sizes is not None else self.resolution
        return image_to_tensor(path, size, self.center_crop, flip, rng)

    def _load_masked(self, path: Path, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The instance image and its loss mask, cropped and flipped alike (the same draws as :meth:`_load`)."""
        rng = random.Random(f"{self.seed}/{self.epoch}/instance/{index}")
        flip = self.random_flip and rng.random() < 0.5
        mask = load_mask(path, self.mask_dir if self.masks == "files" else None)
        size = self.size_at(index) if self.sizes is not None else self.resolution
        return image_and_mask_to_tensors(path, mask, size, self.center_crop, flip, rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = index % len(self.instance_images)
        if self.masks == "none":
            item = {"instance_pixel_values": self._load(self.instance_images[i], "instance", index)}
        else:
            pixels, mask = self._load_masked(self.instance_images[i], index)
            item = {"instance_pixel_values": pixels, "instance_mask": mask}
        item["instance_prompt"] = self.prompts[i]
        size = self.size_at(index)
        if self.latents is not None:  # the cached posterior (data.cache_latents) stands in for the VAE
            item["instance_latent_parameters"] = self.latents[(self.instance_images[i], size)]
        if self.class_images:  # at the instance image's size: the two halves of a batch stack
            path = self.class_images[index % len(self.class_images)]
            item["class_pixel_values"] = self._load(path, "class", index)
            item["class_prompt"] = self.class_prompts[index % len(self.class_images)]
            if self.latents is not None:
                item["class_latent_parameters"] = self.latents[(path, size)]
        return item


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``(B, tokenizer.model_max_length)``: padded to the maximum length, truncated."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def collate_dreambooth(
    examples: list[dict[str, Any]],
    tokenizer: Any = None,
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """One batch: ``pixel_values`` ``(B, 3, R, R)`` and ``prompts``, instance items first.

    With class images the batch is ``2B`` long: the first half instance, the second half class
    (the loss splits it the same way). With a tokenizer, ``input_ids`` ``(B, L)`` too; with
    ``tokenize`` (a model family's, e.g. two tokenizers for SDXL), every entry it returns.
    """
    pixels = [e["instance_pixel_values"] for e in examples]
    prompts = [e["instance_prompt"] for e in examples]
    if "class_pixel_values" in examples[0]:
        pixels += [e["class_pixel_values"] for e in examples]
        prompts += [e["class_prompt"] for e in examples]
    batch = {"pixel_values": torch.stack(pixels).contiguous(), "prompts": prompts}
    if "instance_latent_parameters" in examples[0]:
        cached = [e["instance_latent_parameters"] for e in examples]
        cached += [e["class_latent_parameters"] for e in examples if "class_latent_parameters" in e]
        batch["latent_parameters"] = torch.stack(cached).contiguous()
    if "instance_mask" in examples[0]:  # loss masks (1 on class images: their loss is never masked)
        masks = [e["instance_mask"] for e in examples]
        masks += [torch.ones_like(masks[0]) for _ in range(len(pixels) - len(masks))]
        batch["loss_mask"] = torch.stack(masks).contiguous()
    if tokenizer is not None:
        batch["input_ids"] = tokenize_prompts(tokenizer, prompts)
    if tokenize is not None:
        batch.update(tokenize(prompts))
    return batch


def dreambooth_prompts(
    instance_images: Sequence[Path],
    instance_prompt: str,
    caption_extension: str = ".txt",
    class_prompt: str | None = None,
    class_images: Sequence[Path] = (),
) -> list[str]:
    """Every distinct prompt a :class:`DreamBoothDataset` of these images gives, in first-use order:
    each image's caption file (else ``instance_prompt``; ``instance_prompt`` alone without images),
    then, if ``class_prompt`` is given, each class image's caption file (else ``class_prompt``) and
    ``class_prompt``."""
    prompts = [read_caption(p, caption_extension) or instance_prompt for p in instance_images]
    prompts = prompts or [instance_prompt]
    if class_prompt:
        prompts += [read_caption(p, caption_extension) or class_prompt for p in class_images]
        prompts.append(class_prompt)
    return list(dict.fromkeys(prompts))


class EpochSampler(Sampler[int]):
    """A fresh permutation of ``range(n)`` each epoch, drawn from ``(seed, epoch)`` only.

    Every process draws the same order (accelerate shards it by batches), and a resumed run
    replays the same order from any epoch, independent of the global RNG.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        rng = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=rng).tolist())


@torch.no_grad()
def generate_class_images(
    pipe: Any,
    class_dir: str | os.PathLike[str],
    class_prompt: str,
    num_images: int,
    batch_size: int = 4,
    num_inference_steps: int = 25,
    resolution: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    context_prompts: Sequence[str] = (),
) -> list[Path]:
    """Fill ``class_dir`` up to ``num_images`` images of ``class_prompt`` sampled from ``pipe``.

    Images already there (from an earlier run) are reused; only the missing ones are generated,
    image ``k`` from seed ``seed + k`` (:func:`~boft_diffusion.sampling.seeded_images`) as
    ``class_{k:05d}.png``. With ``context_prompts`` (the class in contexts the subject should keep,
    e.g. "a photo of a dog on a beach") every odd ``k`` is sampled from the next context prompt instead,
    and its caption file ``class_{k:05d}.txt`` names it (:class:`DreamBoothDataset` trains it on that
    prompt). Returns the first ``num_images``.
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = list_images(class_dir, role="class", must_exist=False)
    missing = num_images - len(existing)
    if missing > 0:
        taken = {p.name for p in class_dir.iterdir()}
        indices = [k for k in range(num_images + len(taken)) if f"class_{k:05d}.png" not in taken][:missing]
        bar = tqdm(total=missing, desc="Generating class images", disable=not show_progress)
        for start in range(0, missing, batch_size):
            chunk = indices[start : start + batch_size]
            prompts = [class_image_prompt(k, class_prompt, context_prompts) for k in chunk]
            images = seeded_images(
                pipe,
                prompts,
                [seed + k for k in chunk],
                num_inference_steps=num_inference_steps,
                height=resolution,
                width=resolution,
            )
            for k, image, prompt in zip(chunk, images, prompts):
                if prompt != class_prompt:  # its caption first: an image never stands without it
                    with atomic_file(class_dir / f"class_{k:05d}.txt") as tmp:
                        Path(tmp).write_text(prompt, encoding="utf-8")
                # Atomic: a killed run leaves no half image for the next run to reuse.
                with atomic_file(class_dir / f"class_{k:05d}.png") as tmp:
                    image.save(tmp, format="PNG")
            bar.update(len(chunk))
        bar.close()
        existing = list_images(class_dir, role="class")
    return existing[:num_images]


def class_image_prompt(k: int, class_prompt: str, context_prompts: Sequence[str] = ()) -> str:
    """The prompt of generated class image ``k``: ``class_prompt``, or with ``context_prompts`` every odd
    image the next of them in turn."""
    if not context_prompts or k % 2 == 0:
        return class_prompt
    return context_prompts[(k // 2) % len(context_prompts)]
