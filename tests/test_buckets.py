"""Aspect-ratio buckets (data.buckets, data.bucket_step, data.bucket_sizes): the bucket list, assignment,
one bucket per batch, bad input, and a mixed-size folder training through buckets with a latent cache."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DREAMBOOTH_FAST, recipe_config
from PIL import Image

from boft_diffusion.data import (
    BucketBatchSampler,
    DataError,
    assign_buckets,
    auto_buckets,
    bucket_table,
    parse_bucket_sizes,
)
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, DreamBoothRecipe, run
from boft_diffusion.training.args import ConfigError

SIZES = [(64, 64), (96, 48), (48, 96), (80, 64), (100, 100)]


def folder_of(tmp_path, sizes=SIZES):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i, 200, 255 - 40 * i)).save(folder / f"photo_{i}.png")
    return folder


def test_automatic_buckets_hold_about_the_same_pixels():
    buckets = auto_buckets(512, 64)
    assert buckets[0] == (512, 512) and (384, 640) in buckets and (640, 384) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 0.5 <= w / h <= 2
        assert w * h >= 0.75 * 512 * 512


def test_each_image_goes_to_the_nearest_aspect(tmp_path):
    folder = folder_of(tmp_path)
    assigned = assign_buckets(sorted(folder.iterdir()), auto_buckets(64, 8))
    by_name = {p.name: size for p, size in assigned.items()}
    assert by_name["photo_0.png"] == (64, 64) and by_name["photo_4.png"] == (64, 64)
    assert by_name["photo_1.png"] == (80, 48) and by_name["photo_2.png"] == (
        48,
        80,
    )  # 2:1 -> the widest there is
    assert by_name["photo_3.png"] == (72, 56)
    table = bucket_table(assigned)
    assert "64x64 (aspect 1.00): 2 images" in table and "(4 in use, 5 images)" in table


def test_a_batch_never_mixes_buckets_and_an_epoch_covers_every_item():
    order = [(64, 64), (80, 48), (64, 64), (48, 80), (80, 48), (64, 64), (80, 48)]
    sampler = BucketBatchSampler(order, batch_size=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5  # 64x64: 2, 80x48: 2, 48x80: 1
    assert sorted(i for b in batches for i in b) == list(range(len(order)))
    assert all(len({order[i] for i in b}) == 1 for b in batches)
    assert list(sampler) == batches  # the same epoch, the same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_bad_buckets_and_images_are_named(tmp_path):
    folder = folder_of(tmp_path, [(64, 64), (16, 16)])
    with pytest.raises(DataError, match=r"photo_1.png: 16x16 is smaller than every bucket"):
        assign_buckets(sorted(folder.iterdir()), auto_buckets(64, 8))
    with pytest.raises(DataError, match=r"bucket\(s\) 48x80 get no image"):
        assign_buckets([folder / "photo_0.png"], [(64, 64), (48, 80)], explicit=True)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_bucket_sizes(["64by64"])
    with pytest.raises(ConfigError, match="bucket_sizes needs data.buckets=true"):
        recipe_config(DreamBoothConfig, tmp_path / "run", "data.bucket_sizes=[64x64]")
    with pytest.raises(ConfigError, match="multiple of 8"):
        recipe_config(DreamBoothConfig, tmp_path / "run", "data.buckets=true", "data.bucket_sizes=[60x64]")


@pytest.mark.slow
def test_a_mixed_size_folder_trains_through_buckets_with_cached_latents(tmp_path, monkeypatch, capsys):
    folder = folder_of(tmp_path)
    shapes, encoded = [], []
    loss, cached = DreamBoothRecipe.compute_loss, DreamBoothRecipe._cached_latents

    def spy_loss(self, batch):
        shapes.append(tuple(batch["pixel_values"].shape[-2:]))
        return loss(self, batch)

    def spy_cache(self, pairs):
        result = cached(self, pairs)
        encoded.append(self.latent_cache.encoded)
        return result

    monkeypatch.setattr(DreamBoothRecipe, "compute_loss", spy_loss)
    monkeypatch.setattr(DreamBoothRecipe, "_cached_latents", spy_cache)
    overrides = [
        *DREAMBOOTH_FAST, "train.max_train_steps=4", "train.train_batch_size=2", f"data.instance_data_dir={folder}",
        "data.buckets=true", "data.center_crop=true", "data.cache_latents=true",
        f"data.latent_cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    first = run(recipe_config(DreamBoothConfig, tmp_path / "a", *overrides))
    assert "Aspect-ratio buckets (4 in use, 5 images)" in capsys.readouterr().out
    assert all(math.isfinite(x) for x in first.losses)
    assert {(48, 80), (80, 48), (64, 64)} <= set(shapes)  # (height, width) of the batches: not all square
    run(recipe_config(DreamBoothConfig, tmp_path / "b", *overrides))
    Image.new("RGB", (96, 48), (0, 0, 0)).save(folder / "photo_1.png")  # one photo changed
    run(recipe_config(DreamBoothConfig, tmp_path / "c", *overrides))
    assert encoded == [5, 0, 1]  # all, then none (reused), then the changed photo alone
    assert torch.isfinite(torch.tensor(first.losses)).all()


@pytest.mark.slow
def test_your_own_photos_with_everything_at_once(tmp_path):
    """Buckets, loss masks, cached latents, metadata captions, class images with prior preservation and EMA
    together on a mixed-size folder: the run trains, resumes and saves the averaged adapter."""
    folder = folder_of(tmp_path)
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in folder.iterdir():
        Image.new("L", Image.open(path).size, 255).save(masks / path.name)
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "photo_1.png", "text": "a photo of sks toy, wide"}\n'
    )
    overrides = [
        *DREAMBOOTH_FAST, "train.max_train_steps=3", "train.train_batch_size=2", f"data.instance_data_dir={folder}",
        "data.buckets=true", "data.center_crop=true", "data.cache_latents=true", f"data.mask_dir={masks}",
        "data.unmasked_loss_weight=0.5", "data.with_prior_preservation=true", "data.num_class_images=3",
        "data.class_inference_steps=2", "train.ema_decay=0.9", "train.checkpointing_steps=2",
    ]  # fmt: skip
    result = run(recipe_config(DreamBoothConfig, tmp_path / "run", *overrides))
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert (tmp_path / "run" / "ema" / "boft_weights.safetensors").is_file()
    resumed = run(
        recipe_config(
            DreamBoothConfig,
            tmp_path / "run",
            *overrides,
            "train.max_train_steps=4",
            "train.resume_from_checkpoint=latest",
        )
    )
    assert resumed.global_step == 4
