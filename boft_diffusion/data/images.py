"""Image files: the one opener (`load_rgb`), listing with a check that each decodes, caption files, loss
masks (a mask file or the alpha channel), and images as ``(3, R, R)`` tensors in ``[-1, 1]`` (resize,
center or random crop, flip; a mask the same way)."""

from __future__ import annotations

import codecs
import functools
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_NAME = "metadata.jsonl"
"""A folder's caption file in the Hugging Face imagefolder layout (``{"file_name": ..., "text": ...}`` per line)."""


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
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() != caption_extension.lower()
        and p.name != METADATA_NAME
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
    """The text of ``<image stem><caption_extension>`` beside the image, if that file exists; else the
    image's row of the folder's ``metadata.jsonl`` (the Hugging Face imagefolder layout: one JSON object per
    line, ``file_name`` and the caption under ``text`` or ``caption``), if there is one.

    UTF-8 (with or without a byte-order mark) and UTF-16 with a byte-order mark are read; any other
    encoding raises :class:`DataError` naming the file.
    """
    path = image.with_suffix(caption_extension)
    if not path.is_file():
        metadata = Path(image).parent / METADATA_NAME
        if not metadata.is_file():
            return None
        stat = metadata.stat()
        return _metadata_captions(str(metadata), stat.st_mtime_ns, stat.st_size).get(Path(image).name)
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
    resolution: int | tuple[int, int],
    center_crop: bool = False,
    flip: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Load an image as a ``(3, resolution, resolution)`` float tensor in ``[-1, 1]``.

    The shorter side is resized to ``resolution`` (bilinear, antialiased), then cropped square:
    centered, or at a position drawn from ``rng``; ``flip`` mirrors it left-right. A ``(width, height)``
    ``resolution`` (an aspect-ratio bucket) gives ``(3, height, width)``: resized to cover it, then cropped.
    """
    (image,) = _fit([load_rgb(path)], _size(resolution), center_crop, flip, rng)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_and_mask_to_tensors(
    path: Path,
    mask: Image.Image,
    resolution: int | tuple[int, int],
    center_crop: bool = False,
    flip: bool = False,
    rng: random.Random | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`image_to_tensor` and its loss ``mask`` (an ``L`` image of the same size, from :func:`load_mask`)
    resized, cropped and flipped the same way: ``(3, R, R)`` in ``[-1, 1]`` and ``(1, R, R)`` in ``[0, 1]``."""
    image, mask = _fit([load_rgb(path), mask], _size(resolution), center_crop, flip, rng)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    weights = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), weights.contiguous()


def _size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (
        (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
    )


def _fit(
    images: list[Image.Image], size: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random | None
) -> list[Image.Image]:
    """The same resize (the smallest that covers ``size`` = (width, height), aspect kept), crop to ``size``
    (centered, or where ``rng`` draws) and flip applied to every image. A square ``size`` resizes the
    shorter side to it, as always."""
    width, height = images[0].size
    target_w, target_h = size
    scale = max(target_w / width, target_h / height)
    scaled = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    if center_crop or rng is None:
        left, top = (scaled[0] - target_w) // 2, (scaled[1] - target_h) // 2
    else:
        left, top = rng.randint(0, scaled[0] - target_w), rng.randint(0, scaled[1] - target_h)
    out = []
    for image in images:
        image = image.resize(scaled, Image.Resampling.BILINEAR)
        image = image.crop((left, top, left + target_w, top + target_h))
        out.append(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)
    return out


_EXIF_ORIENTATION = 0x0112


def image_size(path: Path) -> tuple[int, int]:
    """An image's (width, height) as :func:`load_rgb` turns it upright, read from its header (no decode)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as err:  # noqa: BLE001 (Pillow raises many types)
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_mask(image: Path, mask_dir: Path | None = None) -> Image.Image:
    """The loss mask of ``image`` as an 8-bit ``L`` image of the image's size (white: train, black: do not):
    the file with the image's stem in ``mask_dir`` (any image format; colour is converted to grey), or,
    without ``mask_dir``, the image's own alpha channel. A missing mask, an image without alpha or a mask of
    another size is a :class:`DataError` naming both files."""
    size = image_size(image)
    if mask_dir is None:
        try:
            with Image.open(image) as raw:
                decoded = ImageOps.exif_transpose(raw)
                if "A" not in decoded.getbands() and "transparency" not in decoded.info:
                    raise DataError(f"{image}: data.alpha_mask is set but the image has no alpha channel")
                mask = decoded.convert("RGBA").getchannel("A")
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 (Pillow raises many types; load_rgb above read it already)
            raise DataError(f"{image}: cannot read its alpha channel ({type(err).__name__}: {err})") from None
        return mask
    found = [
        p for p in sorted(Path(mask_dir).glob(f"{image.stem}.*")) if p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not found:
        raise DataError(f"{image}: no loss mask named {image.stem}.<png|jpg|...> in data.mask_dir {mask_dir}")
    mask = load_rgb(found[0]).convert("L")
    if mask.size != size:
        raise DataError(
            f"{found[0]}: the mask is {mask.size[0]}x{mask.size[1]}, its image {image} is {size[0]}x{size[1]}; "
            "a mask must have its image's size"
        )
    return mask


@functools.lru_cache(maxsize=16)
def _metadata_captions(path: str, mtime_ns: int, size: int) -> dict[str, str]:
    """``{file_name: caption}`` of a ``metadata.jsonl`` (cached per file version); a malformed line is a
    :class:`DataError` naming the file and line."""
    captions = {}
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        name = row.get("file_name") if isinstance(row, dict) else None
        text = next((row[k] for k in ("text", "caption") if isinstance(row, dict) and k in row), None)
        if not isinstance(name, str) or not isinstance(text, str):
            raise DataError(
                f"{path}, line {number}: expected a JSON object with a file_name and a text (or caption) string"
            )
        caption = " ".join(text.split())
        if caption:
            captions[Path(name).name] = caption
    return captions
