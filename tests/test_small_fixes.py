"""Small things users trip on (issue #28): the tiny families' default weights, what ``export`` is, and
how data folders treat links and paths that leave them. (The kohya half of the issue is in test_kohya.py.)"""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from boft_diffusion import cli
from boft_diffusion.commands import load_commands
from boft_diffusion.data import DataError, DreamBoothDataset, list_images, load_control_examples, read_caption
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, _usage
from boft_diffusion.training.args import ConfigError, ModelArgs, config_to_yaml, load_config
from boft_diffusion.training.setup import load_pipeline

OTHER_FAMILIES = ("sdxl", "sd3", "flux", "flux2")


# --- model.tiny_weights: the family's weights by default, an explicit world refused where there are none --
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_a_tiny_family_without_world_weights_takes_random_ones_by_default(family, tmp_path):
    cfg = load_config(DreamBoothConfig, overrides=[f"model.tiny_family={family}"])
    assert cfg.model.tiny_weights is None and cfg.model.tiny_pipeline_weights == "random"
    assert cfg.model.name == f"boft_diffusion.tiny ({family}, random, seed 0)"
    saved = tmp_path / "training_config.yaml"  # the run's saved config loads again, to the same weights
    saved.write_text(config_to_yaml(cfg))
    assert load_config(DreamBoothConfig, saved).model.tiny_pipeline_weights == "random"
    explicit = load_config(
        DreamBoothConfig, overrides=[f"model.tiny_family={family}", "model.tiny_weights=random"]
    )
    assert explicit.model.tiny_pipeline_weights == "random"


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_an_explicit_world_is_refused_for_a_family_without_world_weights(family):
    with pytest.raises(
        ConfigError, match=f"model.tiny_weights must be random or null for model.tiny_family={family}"
    ):
        load_config(DreamBoothConfig, overrides=[f"model.tiny_family={family}", "model.tiny_weights=world"])


def test_the_sd_tiny_pipeline_keeps_its_world_weights_by_default():
    model = load_config(DreamBoothConfig).model
    assert model.tiny_weights is None and model.tiny_pipeline_weights == "world"
    assert model.name == "boft_diffusion.tiny (world)"
    assert ModelArgs(tiny_weights="random").tiny_pipeline_weights == "random"
    with pytest.raises(ConfigError, match="model.prediction_type must be epsilon or null"):
        ModelArgs(prediction_type="v_prediction")  # the world weights predict noise, null or not


def test_the_default_random_weights_are_said_in_one_line(capsys):
    pipe = load_pipeline(ModelArgs(tiny_family="sdxl", tiny_seed=3))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    said = [line for line in capsys.readouterr().out.splitlines() if "tiny" in line]
    assert said == [
        "model.tiny_family=sdxl: random tiny weights (seed 3); only the sd-shaped tiny pipeline has world weights"
    ]
    load_pipeline(ModelArgs(tiny_family="sdxl", tiny_weights="random"))  # asked for: nothing to say
    assert "tiny" not in capsys.readouterr().out


def test_the_model_card_loads_the_tiny_family_it_was_trained_on():
    sdxl = load_config(DreamBoothConfig, overrides=["model.tiny_family=sdxl", "model.tiny_seed=2"])
    assert "build_tiny_sdxl_pipeline(seed=2)" in _usage(sdxl)
    assert "from boft_diffusion.tiny import build_tiny_sdxl_pipeline" in _usage(sdxl)
    assert "build_tiny_pipeline()" in _usage(load_config(DreamBoothConfig))
    random_sd = load_config(DreamBoothConfig, overrides=["model.tiny_weights=random"])
    assert 'build_tiny_pipeline(seed=0, weights="random")' in _usage(random_sd)


# --- export: an alias of merge, and its help says so ---------------------------------------------------
def test_export_is_merge_under_another_name_and_the_help_says_so(capsys):
    verbs = load_commands()
    merge, export = verbs["merge"], verbs["export"]
    assert export.run is merge.run and export.add_arguments is merge.add_arguments  # an alias, not a twin
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help column
    assert re.search(r"\bexport alias of merge: the same arguments and output\b", out)
    assert re.search(r"\bmerge merge BOFT adapters .* \(alias: export\)", out)
    assert export.help != merge.help


# --- data folders: links are followed, paths that leave the folder by name are refused -------------------
def _png(path, size=(16, 16), colour=(200, 40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")  # by format: a cache blob has no suffix
    return path


def test_a_linked_image_and_caption_in_the_instance_folder_load(tmp_path):
    """As in a Hugging Face cache: the folder holds links named ``*.png`` to suffix-less blobs elsewhere, and
    the instance folder may itself be a link."""
    blobs = tmp_path / "cache" / "blobs"
    image_blob = _png(blobs / "3f2a")
    (blobs / "9c1d").write_text("a photo of sks dog", encoding="utf-8")
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "dog.png").symlink_to(image_blob)
    (folder / "dog.txt").symlink_to(blobs / "9c1d")
    linked_folder = tmp_path / "instance"
    linked_folder.symlink_to(folder, target_is_directory=True)
    images = list_images(linked_folder)
    assert images == [linked_folder / "dog.png"]
    assert read_caption(images[0]) == "a photo of sks dog"
    item = DreamBoothDataset(images, "a photo of a dog", resolution=16)[0]
    assert tuple(item["instance_pixel_values"].shape) == (3, 16, 16)
    assert item["instance_prompt"] == "a photo of sks dog"


def test_a_control_folder_follows_links_and_refuses_paths_that_leave_it_by_name(tmp_path):
    outside = tmp_path / "elsewhere"
    _png(outside / "0.png")
    _png(outside / "0_edges.png", colour=(255, 255, 255))
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(outside, target_is_directory=True)  # a linked sub-folder: followed
    (data / "edges.png").symlink_to(outside / "0_edges.png")  # a linked file: followed
    row = {"image": "images/0.png", "conditioning_image": "edges.png", "text": "a red square"}
    (data / "metadata.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    (example,) = load_control_examples(data_dir=data)
    assert (example.image, example.condition) == (data / "images/0.png", data / "edges.png")
    for leaving in ("../elsewhere/0.png", "images/../../elsewhere/0.png", str(outside / "0.png")):
        (data / "metadata.jsonl").write_text(json.dumps(row | {"image": leaving}) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match="leaves the data folder"):
            load_control_examples(data_dir=data)
