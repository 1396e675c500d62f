"""ControlNet-style data: an image, its aligned conditioning image and a caption per example, from an
imagefolder (``metadata.jsonl``) or a ``datasets`` dataset, every row checked before training."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset

from .dreambooth import tokenize_prompts
from .images import DataError, load_rgb

# --- ControlNet-style data: image, conditioning image and caption per example ----------------------
#
# The layout is Hugging Face's ``imagefolder`` for ControlNet data (as diffusers' train_controlnet.py
# reads it): ``<data_dir>/metadata.jsonl`` holds one JSON object per line naming the image, its
# conditioning image (both relative to ``data_dir``) and its caption. Every row is checked when the
# examples are listed; pixels are decoded lazily, per item.

_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees: width <-> height
_ASPECT_TOLERANCE = 0.01


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
