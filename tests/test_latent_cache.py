"""The latent cache (data.cache_latents): encoded once, reused by the next run, encoded anew when an image
or the VAE changes, and what training reads from it is the VAE's own posterior. (Training on it draws
its noise in the cached tensor's memory layout, so it is the same training, not the same random numbers.)"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DREAMBOOTH_FAST, recipe_config
from PIL import Image

from boft_diffusion.data import LatentCache, vae_fingerprint
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, DreamBoothRecipe, run
from boft_diffusion.tiny import build_tiny_pipeline, make_instance_images
from boft_diffusion.training.args import ConfigError

CACHED = [
    *DREAMBOOTH_FAST,
    "train.max_train_steps=3",
    "data.center_crop=true",
    "data.cache_latents=true",
    "data.with_prior_preservation=true",
    "data.num_class_images=2",
    "data.class_inference_steps=2",
]


def test_the_cache_is_reused_and_refreshed_when_an_image_or_the_vae_changes(tmp_path):
    images = make_instance_images(tmp_path / "photos", num_images=3, seed=0, resolution=64)
    entries = [(p, (64, 64)) for p in images]
    vae = build_tiny_pipeline(seed=0).vae

    def encode(paths, size):
        return torch.randn(len(paths), 8, size[1] // 4, size[0] // 4)

    cache = LatentCache(tmp_path / "cache", vae_fingerprint(vae))
    first = cache.fill(entries, encode)
    assert cache.encoded == 3 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    again = LatentCache(tmp_path / "cache", vae_fingerprint(vae))
    second = again.fill(entries, encode)
    assert again.encoded == 0 and all(torch.equal(first[e], second[e]) for e in entries)

    Image.new("RGB", (64, 64), (255, 0, 0)).save(images[1])  # the photo changed: encoded anew
    changed = LatentCache(tmp_path / "cache", vae_fingerprint(vae))
    changed.fill(entries, encode)
    assert changed.encoded == 1
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(1e-3)  # another VAE: every image encoded anew
    other = LatentCache(tmp_path / "cache", vae_fingerprint(vae))
    other.fill(entries, encode)
    assert other.encoded == 3
    assert other.key(images[0], (48, 80)) != other.key(images[0], (64, 64))  # another size, another entry


@pytest.mark.slow
def test_a_run_trains_on_the_vaes_own_posteriors_and_the_next_run_reuses_them(tmp_path, monkeypatch):
    encoded, seen = [], []
    original = DreamBoothRecipe._cached_latents
    loss = DreamBoothRecipe.compute_loss

    def spy(self, images):
        result = original(self, images)
        encoded.append(self.latent_cache.encoded)
        return result

    def check(self, batch):  # the cached posterior is exactly what the VAE gives for the batch's images
        with torch.no_grad():
            posterior = self.pipe.vae.encode(batch["pixel_values"]).latent_dist.parameters
        seen.append(torch.equal(posterior, batch["latent_parameters"]))
        return loss(self, batch)

    monkeypatch.setattr(DreamBoothRecipe, "_cached_latents", spy)
    monkeypatch.setattr(DreamBoothRecipe, "compute_loss", check)
    result = run(recipe_config(DreamBoothConfig, tmp_path / "cached", *CACHED))
    assert encoded == [4] and seen == [True] * 3  # 2 instance + 2 class images, encoded once
    assert (tmp_path / "cached" / "latent_cache").is_dir() and all(map(math.isfinite, result.losses))

    shared = tmp_path / "shared_cache"
    run(recipe_config(DreamBoothConfig, tmp_path / "a", *CACHED, f"data.latent_cache_dir={shared}"))
    run(recipe_config(DreamBoothConfig, tmp_path / "b", *CACHED, f"data.latent_cache_dir={shared}"))
    assert encoded[1:] == [4, 0]  # the second run reuses every latent


@pytest.mark.parametrize(
    "overrides", [["data.center_crop=false"], ["data.center_crop=true", "data.random_flip=true"]]
)
def test_the_cache_needs_one_crop_per_image(tmp_path, overrides):
    with pytest.raises(ConfigError, match="data.cache_latents keeps one latent per image"):
        recipe_config(DreamBoothConfig, tmp_path / "run", "data.cache_latents=true", *overrides)
