"""The latent cache (``data.cache_latents``): each training image's VAE posterior, encoded once and kept
on disk as safetensors, keyed by what it depends on.

The key hashes the VAE's fingerprint (its weights), the image file's bytes, the size it trains at (the
resolution, or its aspect-ratio bucket) and the crop,
so an image that changed or another VAE is encoded anew and never silently reused; a file of the cache
holds the posterior's parameters (mean and log-variance, ``DiagonalGaussianDistribution.parameters``), so
training still draws a fresh sample of it each step as without the cache. The cache needs one crop per
image (center crop, no flip): a random crop would need a latent per crop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_file
from .images import DataError

__all__ = ["LATENT_CACHE_NAME", "LatentCache", "vae_fingerprint"]

LATENT_CACHE_NAME = "latent_cache"
"""The cache folder's default name (in ``train.output_dir``)."""
_KEY = "posterior"


Size = tuple[int, int]
"""(width, height) an image is fitted to (the square resolution, or its aspect-ratio bucket)."""


class LatentCache:
    """Posterior parameters of images encoded by one VAE, each at the size it trains at, in ``folder``."""

    def __init__(self, folder: str | Path, vae_fingerprint: str, crop: str = "center") -> None:
        self.folder = Path(folder)
        self.vae_fingerprint, self.crop = vae_fingerprint, crop
        self.encoded = 0
        """Images encoded (not found in the cache) by :meth:`fill` so far."""

    def key(self, image: Path, size: Size) -> str:
        """The cache key of ``image`` at ``size``: a hash of the VAE, the size, the crop and the file's bytes."""
        digest = hashlib.sha256()
        digest.update(f"{self.vae_fingerprint}|{size[0]}x{size[1]}|{self.crop}|".encode())
        try:
            digest.update(Path(image).read_bytes())
        except OSError as err:
            raise DataError(f"{image}: cannot read it for the latent cache ({err})") from None
        return digest.hexdigest()[:40]

    def path(self, image: Path, size: Size) -> Path:
        return self.folder / f"{self.key(image, size)}.safetensors"

    def fill(
        self,
        entries: Sequence[tuple[Path, Size]],
        encode: Callable[[list[Path], Size], torch.Tensor],
        batch_size: int = 4,
    ) -> dict[tuple[Path, Size], torch.Tensor]:
        """``{(image, size): posterior parameters}`` for every entry: read from the cache, or ``encode``d (images
        of one size -> their ``(B, 2C, h, w)`` parameters) in batches and written to it (each file atomic)."""
        found: dict[tuple[Path, Size], torch.Tensor] = {}
        missing: dict[Size, list[Path]] = {}
        files = {
            entry: self.path(*entry) for entry in dict.fromkeys(entries)
        }  # each file's bytes hashed once
        for (image, size), file in files.items():
            if file.is_file():
                try:
                    found[(image, size)] = load_file(str(file))[_KEY]
                    continue
                except (SafetensorError, OSError, KeyError):
                    pass  # a damaged entry is encoded again and replaced
            missing.setdefault(size, []).append(image)
        for size, images in missing.items():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                parameters = encode(chunk, size).detach().float().cpu()
                for image, value in zip(chunk, parameters):
                    with atomic_file(files[(image, size)]) as tmp:
                        save_file({_KEY: value.contiguous()}, str(tmp), metadata={"image": str(image)})
                    found[(image, size)] = value
                self.encoded += len(chunk)
        return found


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A sha256 of what a posterior depends on: the names, dtypes, shapes and bytes of the VAE encoder's
    weights (``encoder.*``, ``quant_conv.*``; all of them for a VAE without those names)."""
    state = vae.state_dict()
    names = sorted(k for k in state if k.startswith(("encoder.", "quant_conv."))) or sorted(state)
    digest = hashlib.sha256()
    for name in names:
        tensor = state[name].detach().cpu().contiguous().flatten()
        digest.update(f"{name}|{tensor.dtype}|{tuple(state[name].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]
