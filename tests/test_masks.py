"""Loss masks (data.mask_dir, data.alpha_mask, data.unmasked_loss_weight): read and checked before training,
cropped and flipped with their image, and weighting the loss as set."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import DREAMBOOTH_FAST, recipe_config
from PIL import Image

from boft_diffusion.data import (
    DataError,
    DreamBoothDataset,
    collate_dreambooth,
    image_and_mask_to_tensors,
    load_mask,
)
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, run
from boft_diffusion.training.args import ConfigError
from boft_diffusion.training.noise import diffusion_loss

FAST = [*DREAMBOOTH_FAST, "train.max_train_steps=3"]


def photos(folder, n=2, size=(80, 64), alpha=False):
    """``n`` photos whose left half is white and right half black (an alpha channel of the same shape)."""
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        array = np.zeros((size[1], size[0], 4 if alpha else 3), dtype=np.uint8)
        array[:, : size[0] // 2] = 255
        array[..., 0] = np.maximum(array[..., 0], 40 * i)
        path = folder / f"photo_{i}.png"
        Image.fromarray(array, "RGBA" if alpha else "RGB").save(path)
        paths.append(path)
    return paths


def masks(folder, images, value=255, size=None):
    folder.mkdir(parents=True)
    for image in images:
        width, height = size or Image.open(image).size
        Image.new("L", (width, height), value).save(folder / f"{image.stem}.png")
    return folder


def test_a_mask_is_cropped_and_flipped_with_its_image(tmp_path):
    (image,) = photos(tmp_path / "photos", n=1, alpha=True)  # alpha = the white half
    mask = load_mask(image)
    for seed in range(4):
        pixels, weights = image_and_mask_to_tensors(
            image, mask, 32, False, seed % 2 == 1, random.Random(seed)
        )
        white = pixels.mean(0) > 0.0  # the mid-grey threshold, as for the mask below
        assert weights.shape == (1, 32, 32)
        assert torch.equal(white, weights[0] > 0.5)  # the mask follows the white half wherever it lands


def test_missing_or_misfit_masks_are_named(tmp_path):
    images = photos(tmp_path / "photos")
    with pytest.raises(DataError, match=r"no loss mask named photo_0"):
        load_mask(images[0], tmp_path)
    folder = masks(tmp_path / "masks", images, size=(40, 32))
    with pytest.raises(DataError, match=r"the mask is 40x32, its image .* is 80x64"):
        load_mask(images[0], folder)
    with pytest.raises(DataError, match="has no alpha channel"):
        load_mask(images[0])


def test_the_loss_weights_the_unmasked_area_as_set():
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    spatial = torch.zeros(2, 1, 8, 8)
    spatial[..., :4] = 1.0
    error = (pred - target) ** 2
    for outside in (0.0, 0.25, 1.0):
        weights = spatial + outside * (1 - spatial)
        expected = (error[..., :4].sum() + outside * error[..., 4:].sum()) / error.numel()
        torch.testing.assert_close(diffusion_loss(pred, target, None, weights), expected)
    torch.testing.assert_close(
        diffusion_loss(pred, target, None, torch.ones(2, 1, 8, 8)), diffusion_loss(pred, target)
    )


def test_class_images_are_never_masked(tmp_path):
    images = photos(tmp_path / "photos")
    dataset = DreamBoothDataset(
        images, "sks", 32, class_images=images, class_prompt="a toy", masks="files",
        mask_dir=masks(tmp_path / "masks", images, value=0),
    )  # fmt: skip
    batch = collate_dreambooth([dataset[0], dataset[1]])
    assert batch["loss_mask"].shape == (4, 1, 32, 32)
    assert batch["loss_mask"][:2].max() == 0 and batch["loss_mask"][2:].min() == 1


@pytest.mark.slow
def test_a_fully_masked_out_run_learns_nothing_and_weight_one_is_no_mask(tmp_path):
    images = photos(tmp_path / "photos", n=2, size=(64, 64))
    data = [f"data.instance_data_dir={tmp_path / 'photos'}"]
    black = masks(tmp_path / "black", images, value=0)
    nothing = run(recipe_config(DreamBoothConfig, tmp_path / "a", *FAST, *data, f"data.mask_dir={black}"))
    assert nothing.losses == [0.0, 0.0, 0.0]
    unmasked = run(recipe_config(DreamBoothConfig, tmp_path / "b", *FAST, *data))
    weight_one = run(
        recipe_config(
            DreamBoothConfig,
            tmp_path / "c",
            *FAST,
            *data,
            f"data.mask_dir={black}",
            "data.unmasked_loss_weight=1",
        )
    )
    assert weight_one.losses == pytest.approx(unmasked.losses, rel=1e-5)


def test_bad_mask_settings_fail_before_anything_is_written(tmp_path):
    images = photos(tmp_path / "photos")
    data = f"data.instance_data_dir={tmp_path / 'photos'}"
    with pytest.raises(ConfigError, match="give mask_dir or alpha_mask, not both"):
        recipe_config(DreamBoothConfig, tmp_path / "run", data, "data.mask_dir=x", "data.alpha_mask=true")
    with pytest.raises(ConfigError, match=r"unmasked_loss_weight must be in \[0, 1\]"):
        recipe_config(DreamBoothConfig, tmp_path / "run", data, "data.unmasked_loss_weight=2")
    with pytest.raises(ConfigError, match="set data.instance_data_dir too"):
        recipe_config(DreamBoothConfig, tmp_path / "run", "data.alpha_mask=true")
    folder = masks(tmp_path / "masks", images[:1])
    with pytest.raises(DataError, match="no loss mask named photo_1"):
        run(recipe_config(DreamBoothConfig, tmp_path / "run", *FAST, data, f"data.mask_dir={folder}"))
    assert not (tmp_path / "run").exists()
