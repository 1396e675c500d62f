"""Datasets for subject finetuning: instance and class images, captions, class-image generation.

Images are checked when listed (a file that does not decode is skipped with a warning naming it),
loaded lazily, and turned into ``(3, R, R)`` tensors in ``[-1, 1]``: shorter side resized to ``R``,
then a center or random ``R x R`` crop and an optional horizontal flip. Random choices are a pure
function of ``(seed, epoch, index)``, so an interrupted run that resumes sees the same pixels.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from .atomic import atomic_file, staged_dir
from .sampling import seeded_images
from .world import caption_of, condition_image, render, sample_scenes

__all__ = [
    "IMAGE_EXTENSIONS",
    "PROMPT_EMBEDDINGS_NAME",
    "ControlColumns",
    "ControlDataset",
    "ControlExample",
    "DataError",
    "DreamBoothDataset",
    "EpochSampler",
    "collate_control",
    "collate_dreambooth",
    "generate_class_images",
    "image_to_tensor",
    "list_images",
    "load_control_examples",
    "dreambooth_prompts",
    "load_prompt_embeddings",
    "load_rgb",
    "read_caption",
    "read_prompt_embeddings_metadata",
    "save_prompt_embeddings",
    "tokenize_prompts",
    "write_world_control_data",
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

    This is the one place images are opened: whatever Pillow raises for a file it cannot decode
    (a decompression bomb, a truncated or unidentified file, an unsupported mode; Pillow raises many
    types) or the system for one it cannot read is a :class:`DataError` naming the file.
    """
    try:
        return _decoded_rgb(path)
    except DataError:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        name = path if isinstance(path, Path | str) else "(image bytes)"
        raise DataError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None


def _decoded_rgb(path: Path) -> Image.Image:
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
        _decoded_rgb(path)
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
) -> list[str]:
    """Every distinct prompt a :class:`DreamBoothDataset` of these images gives, in first-use order:
    each image's caption file (else ``instance_prompt``; ``instance_prompt`` alone without images),
    then ``class_prompt`` if given."""
    prompts = [read_caption(p, caption_extension) or instance_prompt for p in instance_images]
    prompts = prompts or [instance_prompt]
    return list(dict.fromkeys([*prompts, *([class_prompt] if class_prompt else [])]))


PROMPT_EMBEDDINGS_NAME = "prompt_embeddings.safetensors"
"""The file of ``data.cache_prompt_embeddings``: the conditioning of every training prompt."""
PROMPT_EMBEDDINGS_FORMAT = "boft-diffusion prompt embeddings 1"


def save_prompt_embeddings(
    path: str | os.PathLike[str], embeddings: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]
) -> Path:
    """Write ``{prompt: {key: tensor}}`` to the safetensors file ``path`` atomically.

    Tensor ``i/key`` is ``embeddings[prompts[i]][key]``; the metadata holds ``metadata``, the
    format and ``prompts`` (a JSON list)."""
    from safetensors.torch import save_file

    prompts = list(embeddings)
    tensors = {
        f"{i}/{key}": tensor.detach().cpu().contiguous()
        for i, prompt in enumerate(prompts)
        for key, tensor in embeddings[prompt].items()
    }
    meta = {**metadata, "format": PROMPT_EMBEDDINGS_FORMAT, "prompts": json.dumps(prompts)}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_prompt_embeddings_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a :func:`save_prompt_embeddings` file, ``prompts`` parsed into a list.

    A file that is not one raises :class:`DataError` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != PROMPT_EMBEDDINGS_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        prompts = json.loads(meta["prompts"])
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts is not a list of strings")
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise DataError(
            f"{path} is not a prompt-embedding cache of boft-diffusion ({err}); remove it or move it away"
        ) from None
    return {**meta, "prompts": prompts}


def load_prompt_embeddings(
    path: str | os.PathLike[str],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``({prompt: {key: tensor}}, metadata)`` of a :func:`save_prompt_embeddings` file (on the CPU)."""
    from safetensors.torch import load_file

    meta = read_prompt_embeddings_metadata(path)
    prompts = meta["prompts"]
    embeddings: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prompts}
    for name, tensor in load_file(str(path), device="cpu").items():
        index, _, key = name.partition("/")
        embeddings[prompts[int(index)]][key] = tensor
    return embeddings, meta


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
    image ``k`` from seed ``seed + k`` (:func:`~boft_diffusion.sampling.seeded_images`) as
    ``class_{k:05d}.png``. Returns the first ``num_images``.
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
            images = seeded_images(
                pipe,
                [class_prompt] * len(chunk),
                [seed + k for k in chunk],
                num_inference_steps=num_inference_steps,
                height=resolution,
                width=resolution,
            )
            for k, image in zip(chunk, images):
                # Atomic: a killed run leaves no half image for the next run to reuse.
                with atomic_file(class_dir / f"class_{k:05d}.png") as tmp:
                    image.save(tmp, format="PNG")
            bar.update(len(chunk))
        bar.close()
        existing = list_images(class_dir, role="class")
    return existing[:num_images]


# --- ControlNet-style data: image, conditioning image and caption per example ----------------------
#
# The layout is Hugging Face's ``imagefolder`` for ControlNet data (as diffusers' train_controlnet.py
# reads it): ``<data_dir>/metadata.jsonl`` holds one JSON object per line naming the image, its
# conditioning image (both relative to ``data_dir``) and its caption. Every row is checked when the
# examples are listed; pixels are decoded lazily, per item.

_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees: width <-> height
_ASPECT_TOLERANCE = 0.01
_WORLD_MANIFEST = "world_control.json"


@dataclass(frozen=True)
class ControlColumns:
    """Column names of a ControlNet dataset (the defaults of diffusers' train_controlnet.py)."""

    image: str = "image"
    conditioning_image: str = "conditioning_image"
    caption: str = "text"


@dataclass
class ControlExample:
    """One training example: an image, the conditioning image aligned with it, and its caption.

    ``source`` says where the example came from (``".../metadata.jsonl line 3"``,
    ``"dataset 'fill50k' row 3"``) for error messages.
    """

    image: Path | Image.Image
    condition: Path | Image.Image
    caption: str
    source: str


def load_control_examples(
    data_dir: str | Path | None = None,
    dataset_name: str | None = None,
    columns: ControlColumns = ControlColumns(),
    *,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    max_examples: int | None = None,
) -> list[ControlExample]:
    """The examples of a local ControlNet folder (``data_dir``) or of a ``datasets`` dataset.

    Exactly one of ``data_dir`` and ``dataset_name`` is given. Every example is checked before
    training: its columns, a string caption, both files present and decodable (``Image.verify``,
    no full decode), and image and condition of the same aspect ratio within 1% (the dataset
    resizes and crops them identically). Local paths are relative to ``data_dir``; an absolute path
    or one with ``..`` is refused (the check is by name: links inside the folder are followed).
    A dataset's images stay encoded (their file path, or a PIL image over their bytes, decoded per
    item), so listing a large dataset does not hold its pixels. ``max_examples`` keeps the first
    ``n``. Raises :class:`DataError` naming the folder, the line or row, the column and the file.
    """
    if (data_dir is None) == (dataset_name is None):
        raise DataError("Give exactly one of data_dir (a local folder) and dataset_name (a datasets id)")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be at least 1 (or None for all), got {max_examples}")
    if data_dir is not None:
        return _folder_examples(Path(data_dir).expanduser(), columns, max_examples)
    return _dataset_examples(dataset_name, dataset_config_name, split, cache_dir, columns, max_examples)


def _metadata_rows(data_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each non-blank line of ``data_dir/metadata.jsonl``, checked to be an object."""
    if not data_dir.exists():
        raise DataError(f"The ControlNet data folder {data_dir} does not exist")
    if not data_dir.is_dir():
        raise DataError(f"The ControlNet data folder {data_dir} is not a folder")
    metadata = data_dir / "metadata.jsonl"
    if not metadata.is_file():
        raise DataError(
            f"{data_dir} has no metadata.jsonl: ControlNet data needs one JSON object per line naming "
            "the image, the conditioning image (paths relative to the folder) and the caption"
        )
    try:
        text = metadata.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{metadata} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    # Split on newlines only: str.splitlines would also split inside a JSON string holding U+2028.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{metadata} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object ({{...}}), got {type(row).__name__}")
        yield where, row


def _folder_examples(
    data_dir: Path, columns: ControlColumns, max_examples: int | None
) -> list[ControlExample]:
    examples = []
    for where, row in _metadata_rows(data_dir):
        image_column = columns.image
        if image_column == "image" and "image" not in row and "file_name" in row:
            image_column = "file_name"  # as Hugging Face's imagefolder names the image column
        for column in (image_column, columns.conditioning_image, columns.caption):
            if column not in row:
                also = " (nor 'file_name')" if column == "image" else ""
                raise DataError(
                    f"{where}: no column {column!r}{also}; the row has columns {', '.join(map(repr, row))}"
                )
        image = _folder_file(data_dir, row[image_column], where, image_column)
        condition = _folder_file(data_dir, row[columns.conditioning_image], where, columns.conditioning_image)
        caption = _caption(row[columns.caption], where, columns.caption)
        _check_pair(image, condition, where)
        examples.append(ControlExample(image, condition, caption, where))
        if len(examples) == max_examples:
            break
    if not examples:
        raise DataError(f"{data_dir / 'metadata.jsonl'} is empty: no example to train on")
    return examples


def _folder_file(data_dir: Path, value: Any, where: str, column: str) -> Path:
    """``data_dir / value``, refusing non-strings, absolute paths, ``..`` and missing files."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: column {column!r} holds {value!r}, not a file path")
    parts = PurePosixPath(value.replace("\\", "/")).parts
    if Path(value).is_absolute() or PureWindowsPath(value).drive or parts[:1] == ("/",) or ".." in parts:
        raise DataError(
            f"{where}: column {column!r} path {value!r} leaves the data folder {data_dir}; "
            "give paths relative to it, without '..'"
        )
    path = data_dir / value
    if not path.is_file():
        raise DataError(f"{where}: column {column!r}: file {path} does not exist")
    return path


def _caption(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: caption column {column!r} holds a {type(value).__name__} ({value!r:.60}), not a string"
        )
    return value


def _orientation_swaps(image: Image.Image) -> bool:
    """Whether the EXIF orientation turns the image by 90 degrees (read without decoding pixels)."""
    if image.format == "PNG":  # PngImageFile.getexif decodes the whole image; the header's copy suffices
        exif = Image.Exif()
        if image.info.get("exif"):
            exif.load(image.info["exif"])
    else:
        exif = image.getexif()
    return exif.get(ExifTags.Base.Orientation, 1) in _SWAPPING_ORIENTATIONS


def _displayed_size(file: Path | io.BytesIO, where: str, role: str) -> tuple[int, int]:
    """``(width, height)`` as :func:`load_rgb` will show the image, after ``Image.verify``."""
    name = file if isinstance(file, Path) else "(bytes)"
    try:
        with Image.open(file) as image:
            width, height = image.size
            swapped = _orientation_swaps(image)
            image.verify()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise DataError(
            f"{where}: the {role} {name} is not a readable image ({type(err).__name__}: {err})"
        ) from None
    return (height, width) if swapped else (width, height)


def _size_of(value: Path | Image.Image, where: str, role: str) -> tuple[int, int]:
    if isinstance(value, Path):
        return _displayed_size(value, where, role)
    if isinstance(getattr(value, "fp", None), io.BytesIO):  # a lazy image over dataset bytes
        return _displayed_size(io.BytesIO(value.fp.getvalue()), where, role)
    return (value.height, value.width) if _orientation_swaps(value) else value.size


def _check_pair(image: Path | Image.Image, condition: Path | Image.Image, where: str) -> None:
    """Both decodable, and of the same aspect ratio within 1%: else the identical crop cannot align them."""
    iw, ih = _size_of(image, where, "image")
    cw, ch = _size_of(condition, where, "conditioning image")
    ratios = sorted((iw / ih, cw / ch))
    mismatch = ratios[1] / ratios[0] - 1.0
    if mismatch > _ASPECT_TOLERANCE + 1e-12:  # exactly 1% (101x50 vs 100x50) passes despite rounding
        names = f" ({image} vs {condition})" if isinstance(image, Path) else ""
        raise DataError(
            f"{where}: the image is {iw}x{ih} but its conditioning image is {cw}x{ch}{names}: aspect ratios "
            f"differ by {mismatch:.1%} (more than 1%). Image and condition are resized and cropped "
            "identically, so this pair cannot be aligned; give the condition the image's shape"
        )


def _dataset_examples(
    name: str,
    config_name: str | None,
    split: str,
    cache_dir: str | None,
    columns: ControlColumns,
    max_examples: int | None,
) -> list[ControlExample]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"Loading the dataset {name!r} needs the datasets library: pip install datasets"
        ) from None
    try:
        dataset = datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)
    except Exception as err:  # not found, offline, unknown split or config: name what was asked for
        raise DataError(
            f"Cannot load dataset {name!r} (config {config_name!r}, split {split!r}): {type(err).__name__}: {err}"
        ) from err
    wanted = (columns.image, columns.conditioning_image, columns.caption)
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"Dataset {name!r} has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(repr, dataset.column_names))} (set the image / conditioning image / caption columns)"
        )
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    for column in wanted[:2]:  # keep the encoded bytes or path: pixels are decoded per item, not all now
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    examples = []
    for index, row in enumerate(dataset):
        where = f"dataset {name!r} row {index}"
        image = _dataset_image(row[columns.image], where, columns.image)
        condition = _dataset_image(row[columns.conditioning_image], where, columns.conditioning_image)
        caption = _caption(row[columns.caption], where, columns.caption)
        _check_pair(image, condition, where)
        examples.append(ControlExample(image, condition, caption, where))
    if not examples:
        raise DataError(f"Dataset {name!r} split {split!r} is empty: no example to train on")
    return examples


def _dataset_image(value: Any, where: str, column: str) -> Path | Image.Image:
    """A dataset cell as a file path or a lazily decoded image: PIL, bytes, path or ``{"bytes", "path"}``."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        value = value["bytes"]
    elif isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, bytes):
        return Image.open(io.BytesIO(value))  # header only; the pixels are decoded per item
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"{where}: column {column!r}: file {path} does not exist")
        return path
    raise DataError(f"{where}: column {column!r} holds {type(value).__name__} {value!r:.60}, not an image")


def _open_rgb(value: Path | Image.Image) -> Image.Image:
    """An example's image as 8-bit RGB, mapped like :func:`load_rgb` (EXIF orientation, high bit depths)."""
    if isinstance(value, Path):
        return load_rgb(value)
    if isinstance(getattr(value, "fp", None), io.BytesIO):
        # A lazy image over dataset bytes: decode a fresh copy, so the example never keeps the pixels.
        return load_rgb(io.BytesIO(value.fp.getvalue()))  # type: ignore[arg-type]
    image = ImageOps.exif_transpose(value)
    if image.mode in _HIGH_BIT_MODES:  # one mapping of high-bit pixels: load_rgb's, over a lossless copy
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
        return load_rgb(buffer)  # type: ignore[arg-type]
    return image.convert("RGB")


def _paired_crop(
    image: Image.Image, condition: Image.Image, resolution: int, rng: random.Random | None, flip: bool
) -> tuple[Image.Image, Image.Image]:
    """Image and condition resized, cropped and flipped by the one same geometry (as :func:`image_to_tensor`).

    The image's shorter side goes to ``resolution``; the condition is resized to the image's new size
    (their aspect ratios agree within 1%), then both take the same ``R x R`` window: centered, or at
    an offset drawn from ``rng``.
    """
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    condition = condition.resize(size, Image.Resampling.BILINEAR)
    if rng is None:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    box = (left, top, left + resolution, top + resolution)
    image, condition = image.crop(box), condition.crop(box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        condition = condition.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, condition


def _chw(image: Image.Image, scale: float, shift: float) -> torch.Tensor:
    """``(3, H, W)`` float tensor ``pixels * scale + shift`` of an RGB image."""
    array = np.asarray(image, dtype=np.float32) * scale + shift
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ControlDataset(Dataset):
    """ControlNet training items: the image, its aligned conditioning image and the caption.

    Item ``i`` holds ``pixel_values`` ``(3, R, R)`` in ``[-1, 1]``, ``conditioning_pixel_values``
    ``(3, R, R)`` in ``[0, 1]`` (as diffusers' train_controlnet.py) and ``prompt``. Both images are
    resized (shorter side to ``R``, bilinear), cropped (center or random) and flipped by the same
    geometry, so the condition stays aligned pixel for pixel. The caption is replaced by ``""``
    with probability ``proportion_empty_prompts`` (classifier-free guidance). Every random choice
    is a pure function of ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        examples: list[ControlExample],
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not examples:
            raise DataError("ControlDataset needs at least one example")
        if not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
            raise DataError(
                f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution!r}"
            )
        if not 0.0 <= proportion_empty_prompts <= 1.0:  # NaN fails too
            raise DataError(f"proportion_empty_prompts must lie in [0, 1], got {proportion_empty_prompts!r}")
        self.examples = list(examples)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.proportion_empty_prompts = float(proportion_empty_prompts)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def _open(self, example: ControlExample, role: str) -> Image.Image:
        value = getattr(example, role)
        try:
            return _open_rgb(value)
        except Exception as err:
            name = value if isinstance(value, Path) else f"{type(value).__name__} image"
            raise DataError(
                f"{example.source}: cannot load the {role} {name} ({type(err).__name__}: {err})"
            ) from err

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        rng = random.Random(f"{self.seed}/{self.epoch}/control/{index}")
        # Both draws are always made: toggling the flip or the prompt dropout leaves the crops as they were.
        flip_draw, drop_draw = rng.random(), rng.random()
        image, condition = _paired_crop(
            self._open(example, "image"),
            self._open(example, "condition"),
            self.resolution,
            None if self.center_crop else rng,
            self.random_flip and flip_draw < 0.5,
        )
        return {
            "pixel_values": _chw(image, 1 / 127.5, -1.0),
            "conditioning_pixel_values": _chw(condition, 1 / 255.0, 0.0),
            "prompt": "" if drop_draw < self.proportion_empty_prompts else example.caption,
        }


def collate_control(examples: list[dict[str, Any]], tokenizer: Any = None) -> dict[str, Any]:
    """One batch: ``pixel_values`` and ``conditioning_pixel_values`` ``(B, 3, R, R)`` float32, ``prompts``.

    With a tokenizer, ``input_ids`` ``(B, L)`` too (:func:`tokenize_prompts`).
    """
    prompts = [e["prompt"] for e in examples]
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).float().contiguous(),
        "conditioning_pixel_values": torch.stack([e["conditioning_pixel_values"] for e in examples])
        .float()
        .contiguous(),
        "prompts": prompts,
    }
    if tokenizer is not None:
        batch["input_ids"] = tokenize_prompts(tokenizer, prompts)
    return batch


def write_world_control_data(
    folder: str | Path, num_examples: int, seed: int, kind: str = "edges", resolution: int = 64
) -> Path:
    """The embedded world's ControlNet data in ``folder``, in the layout :func:`load_control_examples` reads.

    ``images/00000.png`` (the scene rendered at ``resolution``), ``conditioning_images/00000.png``
    (its ``condition_image(maps, kind)``), ``metadata.jsonl`` rows ``{"image", "conditioning_image",
    "text"}`` (the scene's caption), for ``sample_scenes(num_examples, seed=seed)``; plus
    ``world_control.json``, the manifest that marks the folder as written here. Deterministic (same
    bytes for the same arguments) and atomic (built beside ``folder``, then renamed). A complete
    folder written with the same arguments is reused; one written here with other arguments is
    replaced; any other existing folder (other files in it) is a :class:`DataError`.
    """
    folder = Path(folder).expanduser()
    for label, value, low in (("num_examples", num_examples, 1), ("resolution", resolution, 8)):
        if not isinstance(value, int) or value < low:
            raise DataError(f"{label} must be an integer >= {low}, got {value!r}")
    if kind not in ("mask", "edges"):
        raise DataError(f"Unknown condition kind {kind!r}; expected 'mask' or 'edges'")
    manifest = {
        "writer": "boft_diffusion.data.write_world_control_data",
        "num_examples": num_examples,
        "seed": seed,
        "kind": kind,
        "resolution": resolution,
    }
    state = _world_data_state(folder, manifest)
    if state == "complete":
        return folder
    if state == "foreign":
        raise DataError(_foreign_world_folder(folder))
    try:
        with staged_dir(
            folder, replace=lambda target: _world_data_state(target, manifest) == "stale"
        ) as staging:
            _write_world_examples(staging, manifest)
    except FileExistsError:  # another process finished it meanwhile: fine if it is what we wanted
        if _world_data_state(folder, manifest) != "complete":
            raise DataError(_foreign_world_folder(folder)) from None
    return folder


def _foreign_world_folder(folder: Path) -> str:
    return (
        f"{folder} exists and is not world ControlNet data written by write_world_control_data "
        f"(no matching {_WORLD_MANIFEST}, or other files in it); choose another folder"
    )


def _world_files(num_examples: int) -> set[str]:
    names = [f"{k:05d}.png" for k in range(num_examples)]
    return {
        _WORLD_MANIFEST,
        "metadata.jsonl",
        "images",
        "conditioning_images",
        *(f"images/{n}" for n in names),
        *(f"conditioning_images/{n}" for n in names),
    }


def _world_data_state(folder: Path, manifest: dict[str, Any]) -> str:
    """``"missing"``, ``"complete"`` (ours, these arguments), ``"stale"`` (ours or empty) or ``"foreign"``."""
    if not folder.exists() and not folder.is_symlink():
        return "missing"
    if folder.is_symlink() or not folder.is_dir():
        return "foreign"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    if not present:
        return "stale"
    try:
        found = json.loads((folder / _WORLD_MANIFEST).read_text(encoding="utf-8"))
        ours = found["writer"] == manifest["writer"] and present <= _world_files(int(found["num_examples"]))
    except (OSError, ValueError, TypeError, KeyError):
        return "foreign"
    if not ours:
        return "foreign"
    if found != manifest or "metadata.jsonl" not in present:
        return "stale"
    rows = len((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines())
    return "complete" if rows == manifest["num_examples"] and present == _world_files(rows) else "stale"


def _write_world_examples(staging: Path, manifest: dict[str, Any]) -> None:
    (staging / "images").mkdir()
    (staging / "conditioning_images").mkdir()
    rows = []
    for k, scene in enumerate(sample_scenes(manifest["num_examples"], seed=manifest["seed"])):
        pixels, maps = render(scene, manifest["resolution"])
        name = f"{k:05d}.png"
        Image.fromarray(pixels).save(staging / "images" / name, format="PNG")
        condition_image(maps, manifest["kind"]).save(staging / "conditioning_images" / name, format="PNG")
        row = {
            "image": f"images/{name}",
            "conditioning_image": f"conditioning_images/{name}",
            "text": caption_of(scene),
        }
        rows.append(json.dumps(row))
    (staging / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (staging / _WORLD_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
