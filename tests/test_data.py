"""boft_diffusion.data: image listing and checks, transforms, the DreamBooth dataset, class images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from boft_diffusion.data import (
    DataError,
    DreamBoothDataset,
    EpochSampler,
    collate_dreambooth,
    dreambooth_prompts,
    generate_class_images,
    image_to_tensor,
    list_images,
    read_caption,
    tokenize_prompts,
)
from boft_diffusion.tiny import build_tiny_tokenizer, make_instance_images


def _image(path, size=(40, 24), color=(200, 10, 10)):
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def instance_dir(tmp_path):
    folder = tmp_path / "instance"
    make_instance_images(folder, num_images=3, resolution=32)
    return folder


# --- listing and checks ---------------------------------------------------------------------------
def test_list_images_sorted_skips_captions_and_hidden(instance_dir):
    (instance_dir / "toy_00.txt").write_text("a photo of sks toy on a table")
    (instance_dir / ".DS_Store").write_bytes(b"\0\1")
    images = list_images(instance_dir)
    assert [p.name for p in images] == ["toy_00.png", "toy_01.png", "toy_02.png"]


def test_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"instance image folder .*nowhere does not exist"):
        list_images(tmp_path / "nowhere")
    assert list_images(tmp_path / "nowhere", must_exist=False) == []


def test_empty_folder_and_file_instead_of_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        list_images(tmp_path / "empty")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is not a folder"):
        list_images(tmp_path / "file.png")


def test_corrupt_and_non_image_files_are_skipped_with_a_warning_naming_them(instance_dir):
    (instance_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (instance_dir / "notes.md").write_text("hello")
    with pytest.warns(UserWarning) as record:
        images = list_images(instance_dir)
    messages = " ".join(str(w.message) for w in record)
    assert "broken.png" in messages and "notes.md" in messages
    assert [p.name for p in images] == ["toy_00.png", "toy_01.png", "toy_02.png"]


def test_truncated_image_is_skipped(instance_dir):
    data = (instance_dir / "toy_00.png").read_bytes()
    (instance_dir / "toy_00.png").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="toy_00.png"):
        images = list_images(instance_dir)
    assert [p.name for p in images] == ["toy_01.png", "toy_02.png"]


def test_only_unreadable_files_is_an_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"nope")
    with (
        pytest.warns(UserWarning, match="a.jpg"),
        pytest.raises(DataError, match=r"No readable image.*a\.jpg"),
    ):
        list_images(folder)


def test_read_caption(instance_dir):
    image = instance_dir / "toy_01.png"
    assert read_caption(image) is None
    image.with_suffix(".txt").write_text("  a photo of\nsks toy  \n")
    assert read_caption(image) == "a photo of sks toy"
    image.with_suffix(".txt").write_text("   ")
    assert read_caption(image) is None


def test_caption_encodings_bom_utf16_and_undecodable(instance_dir):
    image = instance_dir / "toy_01.png"
    caption = image.with_suffix(".txt")
    caption.write_bytes(b"\xef\xbb\xbfa photo of sks toy")  # UTF-8 with a byte-order mark
    assert read_caption(image) == "a photo of sks toy"
    caption.write_bytes("a photo of sks toy".encode("utf-16"))  # Windows "Unicode" (BOM + UTF-16)
    assert read_caption(image) == "a photo of sks toy"
    caption.write_bytes("une photo de sks jouet \xe0 la plage".encode("latin-1"))
    with pytest.raises(DataError, match=r"toy_01\.txt is not UTF-8"):
        read_caption(image)
    with pytest.raises(DataError, match=r"toy_01\.txt is not UTF-8"):  # found when listing, before training
        list_images(instance_dir)


def test_16_bit_and_float_images_keep_their_range(tmp_path):
    ramp = np.linspace(0.0, 1.0, 32 * 32).reshape(32, 32)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f32.tif")
    Image.fromarray(np.round(ramp * 255).astype(np.uint8)).save(tmp_path / "g8.png")
    reference = image_to_tensor(tmp_path / "g8.png", 32, center_crop=True)
    for name in ("g16.png", "f32.tif"):
        pixels = image_to_tensor(tmp_path / name, 32, center_crop=True)
        assert (pixels - reference).abs().max() <= 2 / 127.5, name  # not clipped to white or black
        assert pixels.min() < -0.99 and pixels.max() > 0.99
    Image.fromarray((ramp * 1000 - 500).astype(np.float32)).save(tmp_path / "odd.tif")
    with pytest.raises(DataError, match=r"odd\.tif.*pixel range"):
        image_to_tensor(tmp_path / "odd.tif", 32)
    with pytest.warns(UserWarning, match="odd.tif"):
        assert [p.name for p in list_images(tmp_path)] == ["f32.tif", "g16.png", "g8.png"]


# --- transforms -----------------------------------------------------------------------------------
def test_image_to_tensor_resizes_shorter_side_and_crops(tmp_path):
    path = _image(tmp_path / "wide.png", size=(80, 40))
    out = image_to_tensor(path, 32, center_crop=True)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.full((32, 32), 200 / 127.5 - 1), atol=1e-5)
    assert out.min() >= -1 and out.max() <= 1


def test_center_crop_random_crop_and_flip(tmp_path):
    array = np.zeros((16, 48, 3), dtype=np.uint8)
    array[:, :, 0] = np.arange(48, dtype=np.uint8)[None, :] * 5  # red ramp left to right
    path = tmp_path / "ramp.png"
    Image.fromarray(array).save(path)
    center = image_to_tensor(path, 16, center_crop=True)
    assert abs(center[0, 0, 0].item() - (16 * 5 / 127.5 - 1)) < 1e-5  # crop starts at x = 16
    import random

    crops = {image_to_tensor(path, 16, rng=random.Random(s))[0, 0, 0].item() for s in range(8)}
    assert len(crops) > 1  # random crop moves
    flipped = image_to_tensor(path, 16, center_crop=True, flip=True)
    assert torch.equal(flipped, center.flip(-1))


# --- dataset and batches --------------------------------------------------------------------------
def test_dataset_items_and_captions(instance_dir):
    images = list_images(instance_dir)
    images[1].with_suffix(".txt").write_text("a red sks toy")
    dataset = DreamBoothDataset(images, "a photo of sks toy", 32)
    assert len(dataset) == 3
    assert [dataset[i]["instance_prompt"] for i in range(3)] == [
        "a photo of sks toy",
        "a red sks toy",
        "a photo of sks toy",
    ]
    assert dataset[0]["instance_pixel_values"].shape == (3, 32, 32)
    assert "class_pixel_values" not in dataset[0]


def test_dataset_with_class_images_cycles_the_smaller_set(instance_dir, tmp_path):
    classes = make_instance_images(tmp_path / "class", num_images=5, seed=3, resolution=32)
    dataset = DreamBoothDataset(
        list_images(instance_dir), "sks", 32, class_images=classes, class_prompt="a toy"
    )
    assert len(dataset) == 5
    item = dataset[4]
    assert item["class_prompt"] == "a toy" and item["class_pixel_values"].shape == (3, 32, 32)
    with pytest.raises(DataError, match="class prompt"):
        DreamBoothDataset(list_images(instance_dir), "sks", 32, class_images=classes)


def test_class_images_may_carry_their_own_captions(instance_dir, tmp_path):
    classes = make_instance_images(tmp_path / "class", num_images=3, seed=3, resolution=32)
    classes[1].with_suffix(".txt").write_text("a photo of a toy on a striped green background")
    dataset = DreamBoothDataset(
        list_images(instance_dir), "sks", 32, class_images=classes, class_prompt="a toy"
    )
    assert [dataset[i]["class_prompt"] for i in range(3)] == [
        "a toy",
        "a photo of a toy on a striped green background",
        "a toy",
    ]
    assert list_images(tmp_path / "class", "class") == classes  # the caption file is no image
    prompts = dreambooth_prompts(list_images(instance_dir), "sks", ".txt", "a toy", classes)
    assert prompts == ["sks", "a toy", "a photo of a toy on a striped green background"]
    assert dreambooth_prompts([], "sks", ".txt", None, classes) == ["sks"]  # no prior preservation


def test_augmentation_depends_on_seed_epoch_index_only(instance_dir):
    images = list_images(instance_dir)
    a = DreamBoothDataset(images, "p", 32, random_flip=True, seed=1)
    b = DreamBoothDataset(images, "p", 32, random_flip=True, seed=1)
    flips_by_epoch = []
    for epoch in range(6):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert all(
            torch.equal(a[i]["instance_pixel_values"], b[i]["instance_pixel_values"]) for i in range(3)
        )
        flips_by_epoch.append(tuple(a[i]["instance_pixel_values"].sum().item() for i in range(3)))
    assert len(set(flips_by_epoch)) > 1  # flips change from epoch to epoch


def test_collate_and_tokenize(instance_dir, tmp_path):
    tokenizer = build_tiny_tokenizer()
    classes = make_instance_images(tmp_path / "class", num_images=2, seed=3, resolution=32)
    dataset = DreamBoothDataset(
        list_images(instance_dir), "a photo of sks toy", 32, class_images=classes, class_prompt="a toy"
    )
    batch = collate_dreambooth([dataset[0], dataset[1]], tokenizer)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["prompts"] == ["a photo of sks toy", "a photo of sks toy", "a toy", "a toy"]
    assert batch["input_ids"].shape == (4, tokenizer.model_max_length)
    assert torch.equal(batch["input_ids"], tokenize_prompts(tokenizer, batch["prompts"]))
    plain = collate_dreambooth([DreamBoothDataset(list_images(instance_dir), "x", 32)[0]])
    assert plain["pixel_values"].shape == (1, 3, 32, 32) and "input_ids" not in plain


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochSampler(10, seed=4)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert sorted(orders[-1]) == list(range(10))
    assert len({tuple(o) for o in orders}) == 3
    again = EpochSampler(10, seed=4)
    again.set_epoch(2)
    assert list(again) == orders[2]
    state = torch.get_rng_state()
    list(again)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not touched
    assert list(EpochSampler(4, shuffle=False)) == [0, 1, 2, 3]


# --- class-image generation -----------------------------------------------------------------------
class _CountingPipe:
    """Wraps the tiny pipeline and counts generated images."""

    def __init__(self, pipe):
        self.pipe, self.generated = pipe, 0

    def __call__(self, prompt, **kwargs):
        self.generated += len(prompt)
        return self.pipe(prompt=prompt, **kwargs)


def test_generate_class_images_fills_missing_and_reuses(tiny_pipe, tmp_path):
    counting = _CountingPipe(tiny_pipe)
    folder = tmp_path / "class"
    paths = generate_class_images(
        counting,
        folder,
        "a photo of a toy",
        3,
        batch_size=2,
        num_inference_steps=2,
        resolution=32,
        show_progress=False,
    )
    assert [p.name for p in paths] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert counting.generated == 3
    assert Image.open(paths[0]).size == (32, 32)
    mtimes = [os.stat(p).st_mtime_ns for p in paths]

    again = generate_class_images(
        counting, folder, "a photo of a toy", 3, num_inference_steps=2, resolution=32
    )
    assert again == paths and counting.generated == 3  # reused, nothing generated
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes

    paths[1].unlink()
    refilled = generate_class_images(
        counting, folder, "a photo of a toy", 3, num_inference_steps=2, resolution=32
    )
    assert counting.generated == 4 and len(refilled) == 3
    assert not list(folder.glob(".*.tmp"))


def test_context_class_images_are_captioned_with_their_prompt(tiny_pipe, tmp_path):
    contexts = ["a photo of a toy on a red background", "a photo of a toy on a striped blue background"]
    paths = generate_class_images(
        tiny_pipe, tmp_path / "class", "a photo of a toy", 5, num_inference_steps=2, resolution=32,
        show_progress=False, context_prompts=contexts,
    )  # fmt: skip
    assert [read_caption(p) for p in paths] == [None, contexts[0], None, contexts[1], None]
    dataset = DreamBoothDataset(paths[:1], "sks", 32, class_images=paths, class_prompt="a photo of a toy")
    assert [dataset[i]["class_prompt"] for i in range(5)] == [
        "a photo of a toy", contexts[0], "a photo of a toy", contexts[1], "a photo of a toy",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.class_context_prompts=[' ']"], "class_context_prompts must be non-blank prompts"),
        (
            ["data.with_prior_preservation=false", "data.class_context_prompts=[a toy on red]"],
            "need data.with_prior_preservation=true",
        ),
    ],
)
def test_class_context_prompts_are_checked(overrides, message):
    from boft_diffusion.recipes.dreambooth import DreamBoothConfig
    from boft_diffusion.training.args import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(DreamBoothConfig, None, overrides)


def test_generated_class_images_are_deterministic(tiny_pipe, tmp_path):
    kwargs = dict(num_inference_steps=2, resolution=32, seed=7, show_progress=False)
    a = generate_class_images(tiny_pipe, tmp_path / "a", "a toy", 2, **kwargs)
    b = generate_class_images(tiny_pipe, tmp_path / "b", "a toy", 2, batch_size=1, **kwargs)
    for x, y in zip(a, b):  # batched kernels may round a pixel differently: one level at most
        diff = np.abs(np.asarray(Image.open(x)).astype(int) - np.asarray(Image.open(y)).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_captions_from_a_metadata_file_when_no_caption_file(instance_dir):
    images = list_images(instance_dir)
    rows = [
        {"file_name": images[0].name, "text": "a photo of sks toy  on grass"},
        {},
        {"file_name": images[1].name, "caption": "x"},
    ]
    (instance_dir / "metadata.jsonl").write_text("".join((json.dumps(r) if r else "") + "\n" for r in rows))
    images[1].with_suffix(".txt").write_text("from the caption file")
    assert list_images(instance_dir) == images  # metadata.jsonl is no image
    assert read_caption(images[0]) == "a photo of sks toy on grass"
    assert read_caption(images[1]) == "from the caption file"  # a caption file wins
    assert read_caption(images[2]) is None
    (instance_dir / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl, line 1: expected a JSON object"):
        read_caption(images[0])
