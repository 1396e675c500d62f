"""Aspect-ratio buckets (``data.buckets``): photos of mixed sizes train at the size of the bucket nearest their
aspect instead of a square crop, and every batch is drawn from one bucket.

The automatic buckets all hold about ``resolution**2`` pixels (as kohya sd-scripts and SimpleTuner size them
by pixel area): for each width ``w`` in steps of ``step`` the tallest height, also a multiple of ``step``, that
keeps ``w * h <= resolution**2``, for aspects from 1:2 to 2:1. An image goes to the bucket whose aspect is
nearest its own (in log space) and is resized to cover it, then cropped. An image with fewer pixels than
the smallest bucket is refused, as is a bucket of ``data.bucket_sizes`` that no image falls into.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch.utils.data import Sampler

from .images import DataError, image_size

__all__ = ["BucketBatchSampler", "assign_buckets", "auto_buckets", "bucket_table", "parse_bucket_sizes"]

Size = tuple[int, int]
"""(width, height) in pixels."""


def auto_buckets(resolution: int, step: int, max_aspect: float = 2.0) -> list[Size]:
    """The buckets of about ``resolution**2`` pixels, sides multiples of ``step``, aspects within
    ``1/max_aspect .. max_aspect``; square first, then by aspect."""
    area, found = resolution * resolution, {(resolution, resolution)}
    for width in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        height = (area // width) // step * step
        if height >= step and 1 / max_aspect <= width / height <= max_aspect:
            found.add((width, height))
    return sorted(found, key=lambda s: (s != (resolution, resolution), s[0] / s[1]))


def parse_bucket_sizes(sizes: Sequence[str], multiple: int = 8) -> list[Size]:
    """``["512x768", ...]`` -> ``[(512, 768), ...]``; sides must be positive multiples of ``multiple``."""
    out = []
    for text in sizes:
        parts = str(text).lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"a bucket is WIDTHxHEIGHT, e.g. 512x768; got {text!r}")
        width, height = (int(p) for p in parts)
        if width < multiple or height < multiple or width % multiple or height % multiple:
            raise ValueError(f"bucket {text!r}: each side must be a positive multiple of {multiple}")
        out.append((width, height))
    if len(set(out)) != len(out):
        raise ValueError(f"bucket sizes repeat: {list(sizes)}")
    return out


def assign_buckets(
    images: Sequence[Path], buckets: Sequence[Size], explicit: bool = False
) -> dict[Path, Size]:
    """``{image: its bucket}``: the bucket whose aspect is nearest the image's. An image with fewer pixels
    than the smallest bucket is a :class:`DataError`; so, with ``explicit`` (the user's list), is a bucket
    that gets no image."""
    smallest = min(buckets, key=lambda s: s[0] * s[1])
    assigned = {}
    for path in images:
        width, height = image_size(path)
        if width * height < smallest[0] * smallest[1]:
            raise DataError(
                f"{path}: {width}x{height} is smaller than every bucket (the smallest is "
                f"{smallest[0]}x{smallest[1]}); use a larger photo or a lower data.resolution"
            )
        aspect = math.log(width / height)
        assigned[path] = min(buckets, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
    if explicit:
        empty = [f"{w}x{h}" for w, h in buckets if (w, h) not in set(assigned.values())]
        if empty:
            raise DataError(f"data.bucket_sizes: bucket(s) {', '.join(empty)} get no image; remove them")
    return assigned


def bucket_table(assigned: dict[Path, Size]) -> str:
    """The buckets in use and how many images each holds, one line each (printed before training)."""
    counts = Counter(assigned.values())
    rows = [
        f"  {w}x{h} (aspect {w / h:.2f}): {n} image{'s' if n != 1 else ''}"
        for (w, h), n in sorted(counts.items())
    ]
    return f"Aspect-ratio buckets ({len(counts)} in use, {len(assigned)} images):\n" + "\n".join(rows)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that share a bucket: each epoch, from ``(seed, epoch)`` only, every bucket's
    indices are shuffled and cut into batches of ``batch_size`` (a bucket's last batch may be smaller), and
    the batches shuffled. Every process draws the same batches; a resumed run replays them from any epoch."""

    def __init__(self, buckets: Sequence[Size], batch_size: int, seed: int = 0) -> None:
        self.buckets, self.batch_size, self.seed = list(buckets), batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(f"buckets/{self.seed}/{self.epoch}")
        by_bucket: dict[Size, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            by_bucket.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        counts = Counter(self.buckets)
        return sum(math.ceil(n / self.batch_size) for n in counts.values())
