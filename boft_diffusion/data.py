"""Datasets for subject finetuning: instance and class images, captions, class-image generation.

Images are checked when listed (a file that does not decode is skipped with a warning naming it),
loaded lazily, and turned into ``(3, R, R)`` tensors in ``[-1, 1]``: shorter side resized to ``R``,
then a center or random ``R x R`` crop and an optional horizontal flip. Random choices are a pure
function of ``(seed, epoch, index)``, so an interrupted run that resumes sees the same pixels.
"""

from __future__ import annotations

import codecs
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from .atomic import atomic_file

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "DreamBoothDataset",
    "EpochSampler",
    "collate_dreambooth",
    "generate_class_images",
    "image_to_tensor",
    "list_images",
    "load_rgb",
    "read_caption",
    "tokenize_prompts",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """Training data the run cannot use; the message names the folder or file."""


def load_rgb(path: Path) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, mapping high-bit-depth and float pixels by their real range.

    Pillow's ``convert("RGB")`` clips 16/32-bit integer pixels to white and float pixels to black.
    Here 16-bit images (``I;16*``, and ``I`` holding values up to 65535) are scaled by ``255/65535``,
    float images (``F``) by 255 when they lie in ``[0, 1]`` (used as-is when in ``[0, 255]``).
    Other ranges raise :class:`DataError` naming the file: there is no safe guess for them.
    """
    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw)
        image.load()
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        if not np.isfinite(array).all():
            raise DataError(f"{path}: image holds non-finite pixel values")
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            scale = 255.0
        elif image.mode == "F" and low >= 0.0 and high <= 255.0:
            scale = 1.0
        elif image.mode != "F" and low >= 0 and high <= 65535:
            scale = 255.0 / 65535.0
        else:
            raise DataError(
                f"{path}: {image.mode} image with pixel range [{low:g}, {high:g}]; expected 16-bit "
                "(0..65535) or float (0..1) values; save it as an 8- or 16-bit PNG"
            )
        image = Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _readable(path: Path) -> str | None:
    """None if ``path`` decodes as an image, else why not."""
    try:
        load_rgb(path)
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"{type(err).__name__}: {err}"
    return None


def list_images(
    folder: str | os.PathLike[str],
    role: str = "instance",
    caption_extension: str = ".txt",
    must_exist: bool = True,
) -> list[Path]:
    """Sorted readable images in ``folder`` (caption files and hidden files are not images).

    A file that does not decode is skipped with a warning naming it. For the ``instance`` role the
    caption files are read too, so one that cannot be decoded fails here, before training. Raises
    :class:`DataError` when the folder is missing (unless ``must_exist`` is False: then ``[]``), empty, or has no
    readable image.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        if not must_exist:
            return []
        raise DataError(f"The {role} image folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"The {role} image folder {folder} is not a folder")
    candidates = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != caption_extension.lower()
    )
    if not candidates:
        if not must_exist:
            return []
        raise DataError(f"The {role} image folder {folder} is empty")
    images, skipped = [], []
    for path in candidates:
        problem = _readable(path)
        if problem is None:
            images.append(path)
        else:
            skipped.append(path.name)
            warnings.warn(f"Skipping {path}: not a readable image ({problem})", stacklevel=2)
    if not images and must_exist:
        raise DataError(
            f"No readable image in the {role} image folder {folder} (skipped: {', '.join(skipped)})"
        )
    if role == "instance":
        for path in images:
            read_caption(path, caption_extension)  # a caption that cannot be read fails now, not mid-run
    return images


def read_caption(image: Path, caption_extension: str = ".txt") -> str | None:
    """The text of ``<image stem><caption_extension>`` beside the image, if that file exists.

    UTF-8 (with or without a byte-order mark) and UTF-16 with a byte-order mark are read; any other
    encoding raises :class:`DataError` naming the file.
    """
    path = image.with_suffix(caption_extension)
    if not path.is_file():
        return None
    raw = path.read_bytes()
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise DataError(
            f"Caption file {path} is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 1]!r}); "
            "save it as UTF-8"
        ) from None
    text = " ".join(text.split())
    return text or None


def image_to_tensor(
    path: Path,
    resolution: int,
    center_crop: bool = False,
    flip: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Load an image as a ``(3, resolution, resolution)`` float tensor in ``[-1, 1]``.

    The shorter side is resized to ``resolution`` (bilinear, antialiased), then cropped square:
    centered, or at a position drawn from ``rng``; ``flip`` mirrors it left-right.
    """
    image = load_rgb(path)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if center_crop or rng is None:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DreamBoothDataset(Dataset):
    """Instance images with their prompts, optionally paired with class images (prior preservation).

    Item ``i`` holds ``instance_pixel_values`` ``(3, R, R)`` and ``instance_prompt`` (the image's
    caption file, else ``instance_prompt``); with class images also ``class_pixel_values`` and
    ``class_prompt``. The length is the larger of the two sets; the smaller one cycles.
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
    ) -> None:
        if not instance_images:
            raise DataError("DreamBoothDataset needs at least one instance image")
        if class_images and not class_prompt:
            raise DataError("Class images need a class prompt")
        self.instance_images = list(instance_images)
        self.prompts = [read_caption(p, caption_extension) or instance_prompt for p in self.instance_images]
        self.class_images = list(class_images or [])
        self.class_prompt = class_prompt
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def _load(self, path: Path, role: str, index: int) -> torch.Tensor:
        rng = random.Random(f"{self.seed}/{self.epoch}/{role}/{index}")
        flip = self.random_flip and rng.random() < 0.5
        return image_to_tensor(path, self.resolution, self.center_crop, flip, rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = index % len(self.instance_images)
        item = {
            "instance_pixel_values": self._load(self.instance_images[i], "instance", index),
            "instance_prompt": self.prompts[i],
        }
        if self.class_images:
            item["class_pixel_values"] = self._load(
                self.class_images[index % len(self.class_images)], "class", index
            )
            item["class_prompt"] = self.class_prompt
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


def collate_dreambooth(examples: list[dict[str, Any]], tokenizer: Any = None) -> dict[str, Any]:
    """One batch: ``pixel_values`` ``(B, 3, R, R)`` and ``prompts``, instance items first.

    With class images the batch is ``2B`` long: the first half instance, the second half class
    (the loss splits it the same way). With a tokenizer, ``input_ids`` ``(B, L)`` too.
    """
    pixels = [e["instance_pixel_values"] for e in examples]
    prompts = [e["instance_prompt"] for e in examples]
    if "class_pixel_values" in examples[0]:
        pixels += [e["class_pixel_values"] for e in examples]
        prompts += [e["class_prompt"] for e in examples]
    batch = {"pixel_values": torch.stack(pixels).contiguous(), "prompts": prompts}
    if tokenizer is not None:
        batch["input_ids"] = tokenize_prompts(tokenizer, prompts)
    return batch


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
) -> list[Path]:
    """Fill ``class_dir`` up to ``num_images`` images of ``class_prompt`` sampled from ``pipe``.

    Images already there (from an earlier run) are reused; only the missing ones are generated,
    image ``k`` from seed ``seed + k`` as ``class_{k:05d}.png``. Returns the first ``num_images``.
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
            generators = [torch.Generator().manual_seed(seed + k) for k in chunk]
            images = pipe(
                [class_prompt] * len(chunk),
                num_inference_steps=num_inference_steps,
                generator=generators,
                height=resolution,
                width=resolution,
            ).images
            for k, image in zip(chunk, images):
                # Atomic: a killed run leaves no half image for the next run to reuse.
                with atomic_file(class_dir / f"class_{k:05d}.png") as tmp:
                    image.save(tmp, format="PNG")
            bar.update(len(chunk))
        bar.close()
        existing = list_images(class_dir, role="class")
    return existing[:num_images]
