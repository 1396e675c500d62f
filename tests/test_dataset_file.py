"""A dataset file naming several DreamBooth concepts (data.dataset_file): parsed strictly, every concept trained
with its repeats, class images and masks, and bad files refused before anything is written."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import DREAMBOOTH_FAST, recipe_config
from PIL import Image

from boft_diffusion.data import ConceptImages, DataError, DreamBoothDataset, collate_dreambooth, load_concepts
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, DreamBoothRecipe, run
from boft_diffusion.recipes.pivotal import PivotalConfig
from boft_diffusion.tiny import make_instance_images
from boft_diffusion.training.args import ConfigError

DOG, CAT = "a photo of sks dog", "a photo of ktn cat"


def photos(folder, n, size=(64, 64), colour=(200, 40, 40)):
    """``n`` small flat photos in ``folder`` (made), each a little different."""
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size, (colour[0], colour[1] + 30 * i, colour[2])).save(folder / f"photo_{i}.png")
    return sorted(folder.iterdir())


def dataset_file(tmp_path, text, name="concepts.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


TWO = """\
concepts:
  - name: dog
    instance_data_dir: dog
    instance_prompt: a photo of sks dog
    repeats: 2
  - instance_data_dir: cat
    instance_prompt: a photo of ktn cat
"""


@pytest.fixture
def two(tmp_path):
    """Two concept folders (dog: 2 photos, cat: 3) and a dataset file giving the dog 2 repeats."""
    photos(tmp_path / "dog", 2)
    photos(tmp_path / "cat", 3, colour=(40, 40, 200))
    return dataset_file(tmp_path, TWO)


def fast(out, *overrides):
    return recipe_config(DreamBoothConfig, out, *DREAMBOOTH_FAST, *overrides)


def test_the_file_reads_paths_from_its_folder_and_toml_says_the_same(tmp_path, two):
    concepts = load_concepts(two)
    assert [(c.name, c.instance_prompt, c.repeats) for c in concepts] == [("dog", DOG, 2), ("cat", CAT, 1)]
    assert concepts[1].instance_data_dir == tmp_path / "cat" and concepts[1].class_data_dir is None
    toml = dataset_file(
        tmp_path,
        '[[concepts]]\nname = "dog"\ninstance_data_dir = "dog"\ninstance_prompt = "a photo of sks dog"\n'
        'repeats = 2\n\n[[concepts]]\ninstance_data_dir = "cat"\ninstance_prompt = "a photo of ktn cat"\n',
        "concepts.toml",
    )
    assert load_concepts(toml) == [replace(c, source=c.source.replace(str(two), str(toml))) for c in concepts]


def test_each_concept_gives_photos_times_repeats_items_with_its_own_class_images(tmp_path):
    dog, cat = photos(tmp_path / "dog", 2), photos(tmp_path / "cat", 3)
    dog_classes, cat_classes = photos(tmp_path / "dogs", 5), photos(tmp_path / "cats", 1)
    dataset = DreamBoothDataset.of_concepts(
        [
            ConceptImages(dog, DOG, dog_classes, "a dog", repeats=2),
            ConceptImages(cat, CAT, cat_classes, "a cat", repeats=2),
        ],
        32,
    )
    # dog: max(2 x 2, 5) = 5 items, its photos cycling; cat: max(3 x 2, 1) = 6, its one class image cycling
    assert len(dataset) == 11
    items = [dataset[i] for i in range(len(dataset))]
    assert Counter(item["instance_prompt"] for item in items) == {DOG: 5, CAT: 6}
    assert all(
        (item["instance_prompt"], item["class_prompt"]) in {(DOG, "a dog"), (CAT, "a cat")} for item in items
    )
    assert {p for p, _ in dataset.pairs()} == {*dog, *cat, *dog_classes, *cat_classes}
    batch = collate_dreambooth(items[4:6])  # the last dog item and the first cat one, each with its class
    assert batch["prompts"] == [DOG, CAT, "a dog", "a cat"]
    with pytest.raises(DataError, match="Class images for some concepts only"):
        DreamBoothDataset.of_concepts(
            [ConceptImages(dog, DOG, dog_classes, "a dog"), ConceptImages(cat, CAT)], 32
        )


def test_two_concepts_train_as_often_as_their_repeats_say(tmp_path, two, monkeypatch, capsys):
    prompts = []
    original = DreamBoothRecipe.compute_loss
    monkeypatch.setattr(
        DreamBoothRecipe, "compute_loss", lambda self, b: prompts.extend(b["prompts"]) or original(self, b)
    )
    out = tmp_path / "run"
    epoch = [
        "train.train_batch_size=7",
        "train.max_train_steps=2",
        "validation.prompts=[]",
    ]  # 2 x 2 + 3 items
    result = run(fast(out, f"data.dataset_file={two}", *epoch))
    assert Counter(prompts) == {DOG: 8, CAT: 6}  # two epochs
    assert result.global_step == 2 and (out / "boft_weights.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "  dog: 2 images x 2 repeats; prompt 'a photo of sks dog'" in printed
    assert "  cat: 3 images x 1 repeats; prompt 'a photo of ktn cat'" in printed
    assert "a photo of sks dog; a photo of ktn cat" in (out / "README.md").read_text()


@pytest.mark.slow
def test_concepts_with_class_images_buckets_masks_cached_latents_and_metrics(tmp_path, monkeypatch, capsys):
    """Prior preservation per concept (one class folder given and filled, one generated into output_dir), buckets
    across the concepts, one concept masked, cached latents; the metrics measure every concept's subject."""
    for name, seed, size in (("dog", 0, (96, 64)), ("cat", 1, (64, 96))):  # views the world scorer reads
        for path in make_instance_images(tmp_path / name, num_images=2, seed=seed, resolution=64):
            Image.open(path).resize(size).save(path)
    dog_masks = tmp_path / "dog_masks"
    dog_masks.mkdir()
    for path in (tmp_path / "dog").iterdir():
        Image.new("L", (96, 64), 255).save(dog_masks / path.name)
    file = dataset_file(
        tmp_path,
        f"""\
concepts:
  - name: dog
    instance_data_dir: dog
    instance_prompt: {DOG}
    class_prompt: a photo of a dog
    class_data_dir: class/dog
    mask_dir: dog_masks
  - name: cat
    instance_data_dir: {tmp_path / "cat"}
    instance_prompt: {CAT}
    class_prompt: a photo of a cat
    num_class_images: 1
""",
    )
    batches = []
    original = DreamBoothRecipe.compute_loss

    def spy(self, batch):
        batches.append(
            (list(batch["prompts"]), tuple(batch["pixel_values"].shape[-2:]), "loss_mask" in batch)
        )
        return original(self, batch)

    monkeypatch.setattr(DreamBoothRecipe, "compute_loss", spy)
    out = tmp_path / "run"
    cfg = fast(
        out, f"data.dataset_file={file}", "data.with_prior_preservation=true", "data.num_class_images=2",
        "data.class_inference_steps=2", "data.buckets=true", "data.center_crop=true", "data.cache_latents=true",
        "train.max_train_steps=4", "metrics.scorer=auto", "metrics.num_images=1", "metrics.num_inference_steps=2",
    )  # fmt: skip
    run(cfg)
    assert len(list((tmp_path / "class" / "dog").glob("*.png"))) == 2  # the given folder, filled
    assert len(list((out / "class_images" / "cat").glob("*.png"))) == 1  # generated inside output_dir
    pairs = {(DOG, "a photo of a dog"), (CAT, "a photo of a cat")}
    assert all(tuple(prompts) in pairs for prompts, _, _ in batches)  # each photo with its own class
    assert {shape for _, shape, _ in batches} == {(48, 80), (80, 48)}  # (height, width): a bucket per concept
    assert all(masked for _, _, masked in batches)
    printed = capsys.readouterr().out
    assert "dog: 2 images x 1 repeats, 2 class images ('a photo of a dog')" in printed
    assert "Aspect-ratio buckets (2 in use, 4 images)" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert report["probe"]["instance_prompt"] == DOG  # the metrics are the first concept's ...
    assert set(report["per_prompt"]["after"][CAT]) == {"subject_fidelity"}  # ... and every concept's fidelity
    assert [c["name"] for c in report["concepts"]] == ["dog", "cat"]
    manifest = json.loads((out / ".boft_diffusion_manifest.json").read_text())["outputs"]
    assert any(entry.startswith("class_images") for entry in manifest)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            TWO.replace("repeats: 2", "repeat: 2"),
            r"concepts\[0\] \('dog'\): unknown key 'repeat'; did you mean 'repeats'\?",
        ),
        (
            TWO.replace("instance_data_dir: cat", "instance_data_dir: cats"),
            r"concepts\[1\] \('cats'\): its instance_data_dir .*cats does not exist",
        ),
        (
            TWO.replace("    instance_prompt: a photo of ktn cat\n", ""),
            r"concepts\[1\] \('cat'\): no instance_prompt",
        ),
        (
            TWO.replace("repeats: 2", "repeats: 0"),
            r"concepts\[0\] \('dog'\): repeats must be an integer >= 1 \(got 0\)",
        ),
        (TWO.replace("name: dog", "name: cat"), "another concept is named 'cat' too"),
        ("concept:\n  - instance_data_dir: dog\n", "unknown key 'concept'; did you mean 'concepts'"),
    ],
    ids=["unknown key", "missing folder", "no prompt", "repeats 0", "same name", "no concepts"],
)
def test_a_bad_dataset_file_is_named_before_anything_is_written(tmp_path, two, text, message):
    two.write_text(text)
    out = tmp_path / "run"
    with pytest.raises(DataError, match=message) as caught:
        run(fast(out, f"data.dataset_file={two}"))
    assert str(two) in str(caught.value)
    assert not out.exists()


def test_prior_preservation_needs_a_class_prompt_per_concept(tmp_path, two):
    out = tmp_path / "run"
    with pytest.raises(
        DataError, match=r"concepts\[0\] \('dog'\): no class_prompt; data.with_prior_preservation"
    ):
        run(fast(out, f"data.dataset_file={two}", "data.with_prior_preservation=true"))
    assert not out.exists()


@pytest.mark.parametrize(
    "override",
    ["data.instance_data_dir=photos", "data.instance_prompt=a photo of sks dog", "data.mask_dir=m"],
)
def test_the_one_concept_keys_conflict_with_a_dataset_file(tmp_path, two, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} is set together with data.dataset_file"):
        fast(tmp_path / "run", f"data.dataset_file={two}", override)
    with pytest.raises(ConfigError, match="data.dataset_file .* not supported"):
        recipe_config(PivotalConfig, tmp_path / "run", f"data.dataset_file={two}")
    assert not (tmp_path / "run").exists()


def test_the_readme_dataset_file_reads_as_it_says(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Several concepts in one run") :]
    block = section[section.index("```yaml\n") + len("```yaml\n") :]
    file = dataset_file(tmp_path, block[: block.index("```")])
    for folder in ("photos/dog", "photos/cat", "masks/dog"):
        (tmp_path / folder).mkdir(parents=True)
    concepts = load_concepts(file, needs_class_prompt=True)
    assert [(c.name, c.repeats, c.num_class_images) for c in concepts] == [("dog", 2, None), ("cat", 1, 100)]
    assert concepts[0].mask_dir == tmp_path / "masks" / "dog"
