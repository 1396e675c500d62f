"""DreamBooth data: instance and class images with their prompts, batches, the epoch sampler and
class-image generation."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from ..atomic import atomic_file
from ..sampling import seeded_images
from .images import (
    DataError,
    image_and_mask_to_tensors,
    image_size,
    image_to_tensor,
    list_images,
    load_mask,
    read_caption,
)


@dataclass(frozen=True)
class ConceptImages:
    """One concept's images as :class:`DreamBoothDataset` pairs them: its instance images (each ``repeats``
    times an epoch) and prompt, its loss masks' folder, its class images and their prompt."""

    instance_images: Sequence[Path]
    instance_prompt: str
    class_images: Sequence[Path] = ()
    class_prompt: str | None = None
    repeats: int = 1
    mask_dir: Path | None = None


@dataclass(frozen=True)
class _Item:
    """What item ``i`` of a :class:`DreamBoothDataset` loads."""

    instance: Path
    prompt: str
    mask_dir: Path | None
    class_image: Path | None
    class_prompt: str | None


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
    :meth:`of_concepts` trains several concepts in one dataset.
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
        concept = ConceptImages(
            instance_images, instance_prompt, class_images or (), class_prompt, 1, mask_dir
        )
        self.items = _pair([concept], caption_extension)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.masks = masks
        self.latents = latents
        self.sizes = sizes

    @classmethod
    def of_concepts(
        cls,
        concepts: Sequence[ConceptImages],
        resolution: int,
        caption_extension: str = ".txt",
        **options: Any,
    ) -> DreamBoothDataset:
        """Several concepts in one dataset: concept ``c`` gives ``max(instance images x repeats, class images)``
        items (the smaller set cycles, as for one concept), each with its own prompts, class images and
        masks (``masks="files"``: a concept without ``mask_dir`` trains on the whole image). ``options``:
        the constructor's other arguments."""
        first = concepts[0]
        dataset = cls(
            first.instance_images,
            first.instance_prompt,
            resolution,
            caption_extension=caption_extension,
            **options,
        )
        dataset.items = _pair(concepts, caption_extension)  # every concept's items, not the first one's alone
        return dataset

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def size_at(self, index: int) -> tuple[int, int]:
        """(width, height) item ``index`` trains at: its instance image's bucket (``sizes``), else square."""
        if self.sizes is None:
            return (self.resolution, self.resolution)
        return self.sizes[self.items[index].instance]

    def pairs(self) -> list[tuple[Path, tuple[int, int]]]:
        """Every (image, size) an epoch loads: what a latent cache must hold."""
        out = []
        for index, item in enumerate(self.items):
            size = self.size_at(index)
            out.append((item.instance, size))
            if item.class_image is not None:
                out.append((item.class_image, size))
        return list(dict.fromkeys(out))

    def _load(self, path: Path, role: str, index: int) -> torch.Tensor:
        rng = random.Random(f"{self.seed}/{self.epoch}/{role}/{index}")
        flip = self.random_flip and rng.random() < 0.5
        size = self.size_at(index) if self.sizes is not None else self.resolution
        return image_to_tensor(path, size, self.center_crop, flip, rng)

    def _load_masked(self, item: _Item, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The instance image and its loss mask, cropped and flipped alike (the same draws as :meth:`_load`)."""
        rng = random.Random(f"{self.seed}/{self.epoch}/instance/{index}")
        flip = self.random_flip and rng.random() < 0.5
        if self.masks == "files" and item.mask_dir is None:  # a concept without masks: all of it trains
            mask = Image.new("L", image_size(item.instance), 255)
        else:
            mask = load_mask(item.instance, item.mask_dir if self.masks == "files" else None)
        size = self.size_at(index) if self.sizes is not None else self.resolution
        return image_and_mask_to_tensors(item.instance, mask, size, self.center_crop, flip, rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.items[index]
        if self.masks == "none":
            item = {"instance_pixel_values": self._load(entry.instance, "instance", index)}
        else:
            pixels, mask = self._load_masked(entry, index)
            item = {"instance_pixel_values": pixels, "instance_mask": mask}
        item["instance_prompt"] = entry.prompt
        size = self.size_at(index)
        if self.latents is not None:  # the cached posterior (data.cache_latents) stands in for the VAE
            item["instance_latent_parameters"] = self.latents[(entry.instance, size)]
        if entry.class_image is not None:  # at the instance image's size: the two halves of a batch stack
            item["class_pixel_values"] = self._load(entry.class_image, "class", index)
            item["class_prompt"] = entry.class_prompt
            if self.latents is not None:
                item["class_latent_parameters"] = self.latents[(entry.class_image, size)]
        return item


def _pair(concepts: Sequence[ConceptImages], caption_extension: str) -> list[_Item]:
    """The items of :class:`DreamBoothDataset`, concept after concept: item ``j`` of a concept pairs its
    ``j``-th instance image (its list repeated ``repeats`` times) with its ``j``-th class image, each list
    cycling up to the longer one."""
    if any(c.class_images for c in concepts) and not all(c.class_images for c in concepts):
        raise DataError("Class images for some concepts only: give every concept class images, or none")
    items = []
    for concept in concepts:
        if not concept.instance_images:
            raise DataError("DreamBoothDataset needs at least one instance image")
        if concept.class_images and not concept.class_prompt:
            raise DataError("Class images need a class prompt")
        instance = list(concept.instance_images) * concept.repeats
        prompts = [
            read_caption(p, caption_extension) or concept.instance_prompt for p in concept.instance_images
        ]
        prompts *= concept.repeats
        classes = list(concept.class_images)
        class_prompts = [read_caption(p, caption_extension) or concept.class_prompt for p in classes]
        for j in range(max(len(instance), len(classes))):
            k = j % len(classes) if classes else None
            items.append(
                _Item(instance[j % len(instance)], prompts[j % len(instance)], concept.mask_dir,
                      None if k is None else classes[k], None if k is None else class_prompts[k])
            )  # fmt: skip
    return items


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
