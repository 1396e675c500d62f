"""boft_diffusion.data, ControlNet side: loading and checking examples, the aligned dataset, world data."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from boft_diffusion.data import (
    ControlColumns,
    ControlDataset,
    ControlExample,
    DataError,
    collate_control,
    image_to_tensor,
    load_control_examples,
    write_world_control_data,
)
from boft_diffusion.tiny import build_tiny_tokenizer
from boft_diffusion.world import caption_of, condition_image, render, sample_scenes


def _noise(size=(48, 32), seed=0):
    """A random RGB image (``size`` is width, height): every crop offset gives different pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _inverted(image):
    return Image.fromarray(255 - np.asarray(image))


def _control_folder(folder, rows, images=None):
    """``folder`` with ``metadata.jsonl`` holding ``rows`` (dicts or raw lines) and the given images."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in (images or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _row(image="a.png", condition="a_c.png", text="a photo"):
    return {"image": image, "conditioning_image": condition, "text": text}


@pytest.fixture
def pair_dir(tmp_path):
    """Two non-square examples whose condition is the inverted image (a pixelwise function of it)."""
    images = {}
    for k in range(2):
        images[f"img/{k}.png"] = _noise(seed=k)
        images[f"cond/{k}.png"] = _inverted(images[f"img/{k}.png"])
    rows = [_row(f"img/{k}.png", f"cond/{k}.png", f"caption {k}") for k in range(2)]
    return _control_folder(tmp_path / "pairs", rows, images)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    return write_world_control_data(tmp_path_factory.mktemp("world") / "data", 4, seed=3, resolution=32)


# --- world data: write, reuse, refuse ---------------------------------------------------------------
def test_world_data_round_trip(world_dir):
    scenes = sample_scenes(4, seed=3)
    examples = load_control_examples(world_dir)
    assert [e.caption for e in examples] == [caption_of(s) for s in scenes]
    assert examples[0].image == world_dir / "images" / "00000.png"
    assert examples[2].condition == world_dir / "conditioning_images" / "00002.png"
    assert "metadata.jsonl line 3" in examples[2].source

    dataset = ControlDataset(examples, resolution=32, center_crop=True)
    assert len(dataset) == 4
    for k, scene in enumerate(scenes):
        item = dataset[k]
        pixels, maps = render(scene, 32)
        assert item["prompt"] == caption_of(scene)
        assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, 32, 32)
        assert item["pixel_values"].dtype == item["conditioning_pixel_values"].dtype == torch.float32
        expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(item["pixel_values"], expected)
        condition = torch.from_numpy(np.array(condition_image(maps, "edges"))).permute(2, 0, 1) / 255
        torch.testing.assert_close(item["conditioning_pixel_values"], condition.float())
        assert set(item["conditioning_pixel_values"].unique().tolist()) == {0.0, 1.0}


def test_world_data_ranges_when_resized(world_dir):
    item = ControlDataset(load_control_examples(world_dir), resolution=16, random_flip=True)[1]
    assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, 16, 16)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["conditioning_pixel_values"].min() >= 0 and item["conditioning_pixel_values"].max() <= 1


def test_world_data_is_deterministic_and_reused(tmp_path):
    a = write_world_control_data(tmp_path / "a", 3, seed=7, kind="mask", resolution=16)
    b = write_world_control_data(tmp_path / "b", 3, seed=7, kind="mask", resolution=16)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert [str(f) for f in files] == [
        "conditioning_images/00000.png",
        "conditioning_images/00001.png",
        "conditioning_images/00002.png",
        "images/00000.png",
        "images/00001.png",
        "images/00002.png",
        "metadata.jsonl",
        "world_control.json",
    ]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    row = json.loads((a / "metadata.jsonl").read_text().splitlines()[0])
    assert row == {
        "image": "images/00000.png",
        "conditioning_image": "conditioning_images/00000.png",
        "text": caption_of(sample_scenes(3, seed=7)[0]),
    }
    mask = np.asarray(Image.open(a / "conditioning_images" / "00000.png"))
    assert np.array_equal(mask[..., 0], render(sample_scenes(3, seed=7)[0], 16)[1].mask * 255)

    stamp = (a / "images" / "00000.png").stat().st_mtime_ns
    assert write_world_control_data(a, 3, seed=7, kind="mask", resolution=16) == a
    assert (a / "images" / "00000.png").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_world_data_written_here_with_other_arguments_is_replaced(tmp_path):
    folder = write_world_control_data(tmp_path / "w", 2, seed=0, resolution=16)
    write_world_control_data(folder, 3, seed=1, resolution=16)
    assert len((folder / "metadata.jsonl").read_text().splitlines()) == 3
    assert not (folder / "images" / "00003.png").exists()
    assert json.loads((folder / "world_control.json").read_text())["seed"] == 1
    (tmp_path / "empty").mkdir()  # an empty folder is filled
    assert len(load_control_examples(write_world_control_data(tmp_path / "empty", 2, seed=0))) == 2


def test_world_data_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"mine exists and is not world ControlNet data"):
        write_world_control_data(tmp_path / "mine", 2, seed=0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    ours = write_world_control_data(tmp_path / "ours", 2, seed=0, resolution=16)
    (ours / "notes.txt").write_text("added by the user")
    with pytest.raises(DataError, match="other files in it"):
        write_world_control_data(ours, 3, seed=0, resolution=16)
    assert (ours / "notes.txt").exists() and (ours / "images" / "00001.png").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not world ControlNet data"):
        write_world_control_data(tmp_path / "file", 2, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_examples": 0}, "num_examples must be an integer >= 1"),
        ({"kind": "depth"}, "Unknown condition kind 'depth'"),
        ({"resolution": 4}, "resolution must be an integer >= 8"),
    ],
)
def test_world_data_argument_errors(tmp_path, kwargs, message):
    args = {"num_examples": 2, "seed": 0, **kwargs}
    with pytest.raises(DataError, match=message):
        write_world_control_data(tmp_path / "w", **args)
    assert not (tmp_path / "w").exists()


# --- the dataset: alignment, determinism, prompt dropout -------------------------------------------
def test_random_crop_and_flip_move_image_and_condition_together(pair_dir):
    examples = load_control_examples(pair_dir)
    dataset = ControlDataset(examples, resolution=16, random_flip=True, seed=5)
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            image = (item["pixel_values"] + 1) / 2
            # Bilinear resizing commutes with inversion up to rounding: one grey level either way.
            assert (item["conditioning_pixel_values"] - (1 - image)).abs().max() <= 1.5 / 255
            seen.add(item["pixel_values"].numpy().tobytes())
    assert len(seen) > 6  # crops and flips really varied


def test_center_crop_matches_image_to_tensor(pair_dir):
    item = ControlDataset(load_control_examples(pair_dir), resolution=16, center_crop=True)[0]
    torch.testing.assert_close(item["pixel_values"], image_to_tensor(pair_dir / "img" / "0.png", 16, True))


def test_flip_mirrors_both(pair_dir):
    examples = load_control_examples(pair_dir)
    plain = ControlDataset(examples, resolution=16, center_crop=True)
    flipping = ControlDataset(examples, resolution=16, center_crop=True, random_flip=True)
    flips = 0
    for epoch in range(8):
        flipping.set_epoch(epoch)
        a, b = plain[0], flipping[0]
        for key in ("pixel_values", "conditioning_pixel_values"):
            same = torch.equal(a[key], b[key])
            mirrored = torch.equal(a[key].flip(-1), b[key])
            assert same or mirrored
        flips += int(not torch.equal(a["pixel_values"], b["pixel_values"]))
    assert 0 < flips < 8


def test_items_are_a_function_of_seed_epoch_index(pair_dir):
    examples = load_control_examples(pair_dir)

    def item(seed, epoch, index):
        dataset = ControlDataset(examples, 16, random_flip=True, proportion_empty_prompts=0.5, seed=seed)
        dataset.set_epoch(epoch)
        return dataset[index]

    a, b = item(1, 2, 1), item(1, 2, 1)
    assert all(torch.equal(a[k], b[k]) for k in ("pixel_values", "conditioning_pixel_values"))
    assert a["prompt"] == b["prompt"]
    others = [item(1, e, 1)["pixel_values"] for e in range(3, 8)] + [
        item(s, 2, 1)["pixel_values"] for s in (2, 3)
    ]
    assert any(not torch.equal(a["pixel_values"], o) for o in others)


def test_proportion_empty_prompts(pair_dir):
    examples = load_control_examples(pair_dir) * 20  # 40 items

    def prompts(p, seed=0):
        dataset = ControlDataset(examples, 8, center_crop=True, proportion_empty_prompts=p, seed=seed)
        return [dataset[i]["prompt"] for i in range(len(dataset))]

    assert prompts(0.0) == [e.caption for e in examples]
    assert prompts(1.0) == [""] * 40
    dropped = [p == "" for p in prompts(0.5)]
    assert 8 <= sum(dropped) <= 32
    assert dropped == [p == "" for p in prompts(0.5)]  # deterministic
    kept = [p for p, d in zip(prompts(0.5), dropped) if not d]
    assert set(kept) == {"caption 0", "caption 1"}


def test_prompt_dropout_leaves_the_crops_alone(pair_dir):
    examples = load_control_examples(pair_dir)
    a = ControlDataset(examples, 16, random_flip=True, proportion_empty_prompts=0.0, seed=3)[1]
    b = ControlDataset(examples, 16, random_flip=True, proportion_empty_prompts=1.0, seed=3)[1]
    assert torch.equal(a["pixel_values"], b["pixel_values"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 12}, "positive multiple of 8"),
        ({"resolution": 0}, "positive multiple of 8"),
        ({"proportion_empty_prompts": -0.1}, r"proportion_empty_prompts must lie in \[0, 1\]"),
        ({"proportion_empty_prompts": 1.5}, r"proportion_empty_prompts must lie in \[0, 1\]"),
        ({"proportion_empty_prompts": float("nan")}, r"proportion_empty_prompts must lie in \[0, 1\]"),
    ],
)
def test_dataset_argument_errors(pair_dir, kwargs, message):
    examples = load_control_examples(pair_dir)
    with pytest.raises(DataError, match=message):
        ControlDataset(examples, **{"resolution": 16, **kwargs})
    with pytest.raises(DataError, match="at least one example"):
        ControlDataset([], 16)


def test_file_broken_after_listing_fails_naming_it(pair_dir):
    dataset = ControlDataset(load_control_examples(pair_dir), 16)
    (pair_dir / "cond" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n gone bad")
    with pytest.raises(DataError, match=r"metadata.jsonl line 2: cannot load the condition .*cond/1.png"):
        dataset[1]
    (pair_dir / "img" / "0.png").unlink()
    with pytest.raises(DataError, match=r"line 1: cannot load the image .*img/0.png"):
        dataset[0]


def test_pil_examples_and_high_bit_depth(tmp_path):
    wide = np.linspace(0, 65535, 24 * 16).reshape(16, 24).astype(np.uint16)
    image = Image.fromarray(wide)  # I;16: mapped by its real range, not clipped to white
    example = ControlExample(image, Image.new("RGB", (24, 16), (255, 255, 255)), "x", "in memory")
    item = ControlDataset([example], 16, center_crop=True)[0]
    assert item["pixel_values"].min() < -0.5 and item["pixel_values"].max() > 0.5
    assert torch.equal(item["conditioning_pixel_values"], torch.ones(3, 16, 16))


def test_collate_with_tiny_tokenizer(pair_dir):
    dataset = ControlDataset(load_control_examples(pair_dir), 16, proportion_empty_prompts=0.0)
    tokenizer = build_tiny_tokenizer()
    batch = collate_control([dataset[0], dataset[1]], tokenizer)
    assert batch["pixel_values"].shape == batch["conditioning_pixel_values"].shape == (2, 3, 16, 16)
    assert batch["pixel_values"].dtype == batch["conditioning_pixel_values"].dtype == torch.float32
    assert batch["conditioning_pixel_values"].is_contiguous()
    assert batch["prompts"] == ["caption 0", "caption 1"]
    assert batch["input_ids"].shape == (2, tokenizer.model_max_length)
    expected = tokenizer(["caption 1"], padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert batch["input_ids"][1].tolist() == expected[0]
    assert "input_ids" not in collate_control([dataset[0]])


# --- loading a folder: layout and every check -------------------------------------------------------
def test_blank_lines_skipped_and_max_examples(pair_dir):
    text = (pair_dir / "metadata.jsonl").read_text()
    (pair_dir / "metadata.jsonl").write_text("\n" + text.replace("\n", "\n\n  \n"))
    examples = load_control_examples(pair_dir)
    assert [e.caption for e in examples] == ["caption 0", "caption 1"]
    assert examples[1].source.endswith("metadata.jsonl line 5")
    assert [e.caption for e in load_control_examples(pair_dir, max_examples=1)] == ["caption 0"]
    with pytest.raises(DataError, match="max_examples must be at least 1"):
        load_control_examples(pair_dir, max_examples=0)


def test_file_name_column_and_custom_columns(tmp_path):
    images = {"a.png": _noise((16, 16)), "a_c.png": _noise((16, 16), seed=1)}
    folder = _control_folder(
        tmp_path / "f", [{"file_name": "a.png", "conditioning_image": "a_c.png", "text": "t"}], images
    )
    assert load_control_examples(folder)[0].image == folder / "a.png"
    rows = [{"target": "a.png", "source": "a_c.png", "prompt": "p"}]
    folder = _control_folder(tmp_path / "g", rows, images)
    (example,) = load_control_examples(folder, columns=ControlColumns("target", "source", "prompt"))
    assert (example.image, example.condition, example.caption) == (folder / "a.png", folder / "a_c.png", "p")


def test_exactly_one_source(pair_dir):
    with pytest.raises(DataError, match="exactly one of data_dir"):
        load_control_examples()
    with pytest.raises(DataError, match="exactly one of data_dir"):
        load_control_examples(pair_dir, dataset_name="fill50k")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist"):
        load_control_examples(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"data folder .*file is not a folder"):
        load_control_examples(tmp_path / "file")
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match=r"bare has no metadata.jsonl"):
        load_control_examples(tmp_path / "bare")
    _control_folder(tmp_path / "empty", [])
    with pytest.raises(DataError, match=r"empty/metadata.jsonl is empty"):
        load_control_examples(tmp_path / "empty")
    (tmp_path / "empty" / "metadata.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_control_examples(tmp_path / "empty")


GOOD = {"a.png": _noise((24, 16)), "a_c.png": _noise((24, 16), seed=1), "sq.png": _noise((16, 16))}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", r"metadata.jsonl line 2: not valid JSON"),
        ('["a.png", "a_c.png", "t"]', r"line 2: expected a JSON object .*got list"),
        (
            {"image": "a.png", "text": "t"},
            r"line 2: no column 'conditioning_image'; the row has columns 'image', 'text'",
        ),
        ({"conditioning_image": "a_c.png", "text": "t"}, r"line 2: no column 'image' \(nor 'file_name'\)"),
        ({"image": "a.png", "conditioning_image": "a_c.png"}, r"line 2: no column 'text'"),
        (_row(text=["two", "captions"]), r"line 2: caption column 'text' holds a list"),
        (_row(text=None), r"line 2: caption column 'text' holds a NoneType"),
        (_row(image=3), r"line 2: column 'image' holds 3, not a file path"),
        (_row(image="missing.png"), r"line 2: column 'image': file .*missing.png does not exist"),
        (
            _row(condition="nope/a.png"),
            r"line 2: column 'conditioning_image': file .*nope/a.png does not exist",
        ),
        (_row(image="/etc/passwd"), r"line 2: column 'image' path '/etc/passwd' leaves the data folder"),
        (_row(condition="../a.png"), r"line 2: column 'conditioning_image' path '../a.png' leaves the data"),
        (_row(image="sub/../../a.png"), r"path 'sub/../../a.png' leaves the data folder"),
        (_row(image="junk.png"), r"line 2: the image .*junk.png is not a readable image"),
        (_row(condition="short.png"), r"line 2: the conditioning image .*short.png is not a readable image"),
        (
            _row(condition="sq.png"),
            r"line 2: the image is 24x16 but its conditioning image is 16x16 .*differ by 50.0% .*cannot be aligned",
        ),
    ],
)
def test_bad_row_is_an_error_naming_line_column_and_file(tmp_path, row, message):
    folder = _control_folder(tmp_path / "d", [_row(), row], GOOD)
    (folder / "junk.png").write_bytes(b"not an image at all")
    (folder / "short.png").write_bytes((folder / "a_c.png").read_bytes()[:200])
    with pytest.raises(DataError, match=message):
        load_control_examples(folder)
    assert load_control_examples(folder, max_examples=1)  # the first row alone is fine


def test_aspect_tolerance_and_resolution_mismatch(tmp_path):
    images = {"a.png": _noise((100, 50)), "b.png": _noise((101, 50)), "c.png": _noise((103, 50))}
    images["half.png"] = images["a.png"].resize((50, 25))
    ok = _control_folder(tmp_path / "ok", [_row("a.png", "b.png"), _row("a.png", "half.png")], images)
    examples = load_control_examples(ok)
    item = ControlDataset(examples, 24, random_flip=True)[1]  # condition resized to the image's size
    assert item["conditioning_pixel_values"].shape == (3, 24, 24)
    bad = _control_folder(tmp_path / "bad", [_row("a.png", "c.png")], images)
    with pytest.raises(DataError, match=r"100x50 but its conditioning image is 103x50 .*differ by 3.0%"):
        load_control_examples(bad)


def test_exif_rotation_counts_for_the_aspect_check(tmp_path):
    folder = tmp_path / "exif"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 16x24, shown 24x16
    _noise((16, 24)).save(folder / "a.jpg", exif=exif.tobytes())
    _noise((24, 16)).save(folder / "c.png")
    _control_folder(folder, [_row("a.jpg", "c.png")])
    item = ControlDataset(load_control_examples(folder), 16)[0]
    assert item["pixel_values"].shape == (3, 16, 16)


# --- loading through `datasets` (offline) -----------------------------------------------------------
def _parquet_dataset(folder, columns=("image", "conditioning_image", "text")):
    datasets = pytest.importorskip("datasets")
    image, condition = _noise((24, 16)), _inverted(_noise((24, 16)))
    table = {columns[0]: [image, image], columns[1]: [condition, condition], columns[2]: ["one", "two"]}
    folder.mkdir()
    datasets.Dataset.from_dict(table).to_parquet(str(folder / "train.parquet"))
    return str(folder)


def test_dataset_by_name_is_lazy_and_aligned(tmp_path):
    name = _parquet_dataset(tmp_path / "hub")
    examples = load_control_examples(dataset_name=name, cache_dir=str(tmp_path / "cache"))
    assert [e.caption for e in examples] == ["one", "two"]
    assert examples[1].source == f"dataset {name!r} row 1"
    assert isinstance(examples[0].image, Image.Image) and examples[0].image.size == (24, 16)
    dataset = ControlDataset(examples, 16, random_flip=True)
    item = dataset[0]
    image = (item["pixel_values"] + 1) / 2
    assert (item["conditioning_pixel_values"] - (1 - image)).abs().max() <= 1.5 / 255
    assert isinstance(examples[0].image.fp, io.BytesIO)  # the example still holds bytes, not pixels
    one = load_control_examples(dataset_name=name, cache_dir=str(tmp_path / "cache"), max_examples=1)
    assert [e.caption for e in one] == ["one"]


def test_dataset_missing_column_lists_the_columns(tmp_path):
    name = _parquet_dataset(tmp_path / "hub", columns=("target", "source", "prompt"))
    with pytest.raises(
        DataError,
        match=r"has no column 'image', 'conditioning_image', 'text'; its columns are 'target', 'source', 'prompt'",
    ):
        load_control_examples(dataset_name=name, cache_dir=str(tmp_path / "cache"))
    columns = ControlColumns(image="target", conditioning_image="source", caption="prompt")
    assert (
        len(load_control_examples(dataset_name=name, columns=columns, cache_dir=str(tmp_path / "cache"))) == 2
    )


def test_dataset_with_path_columns_and_its_errors(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    _noise((24, 16)).save(tmp_path / "a.png")
    _noise((16, 16)).save(tmp_path / "sq.png")
    table = {
        "image": [str(tmp_path / "a.png")],
        "conditioning_image": [{"path": str(tmp_path / "a.png")}],
        "text": ["t"],
    }
    calls = []

    def load_dataset(name, config=None, split="train", cache_dir=None):
        calls.append((name, config, split, cache_dir))
        return datasets.Dataset.from_dict(table)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (example,) = load_control_examples(dataset_name="me/pairs", dataset_config_name="v1", split="val")
    assert calls == [("me/pairs", "v1", "val", None)]
    assert example.image == example.condition == tmp_path / "a.png"
    table["conditioning_image"] = [str(tmp_path / "sq.png")]
    with pytest.raises(DataError, match=r"dataset 'me/pairs' row 0: the image is 24x16 .* 16x16"):
        load_control_examples(dataset_name="me/pairs")
    table["conditioning_image"] = [str(tmp_path / "gone.png")]
    with pytest.raises(
        DataError, match=r"row 0: column 'conditioning_image': file .*gone.png does not exist"
    ):
        load_control_examples(dataset_name="me/pairs")
    table["text"] = [7]
    table["conditioning_image"] = table["image"]
    with pytest.raises(DataError, match=r"row 0: caption column 'text' holds a int"):
        load_control_examples(dataset_name="me/pairs")


def test_dataset_load_failure_and_missing_library(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"Cannot load dataset .*nothing-here.* split 'train'"):
        load_control_examples(dataset_name=str(tmp_path / "nothing-here"), cache_dir=str(tmp_path / "c"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_control_examples(dataset_name="fill50k")
