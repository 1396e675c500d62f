"""Tests for the embedded tiny pipeline: determinism, offline round trip, tokenizer, data, cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from boft_diffusion import tiny

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return tiny.build_tiny_pipeline(seed=0)


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sample(pipe: StableDiffusionPipeline, **kwargs) -> np.ndarray:
    """Two DDIM steps at the native size from a fixed generator: (1, 64, 64, 3) floats in [0, 1]."""
    kwargs = {"height": tiny.TINY_RESOLUTION, "width": tiny.TINY_RESOLUTION, **kwargs}
    generator = torch.Generator().manual_seed(0)
    return pipe(
        tiny.TINY_INSTANCE_PROMPT, num_inference_steps=2, generator=generator, output_type="np", **kwargs
    ).images


def assert_same_weights(a: StableDiffusionPipeline, b: StableDiffusionPipeline) -> None:
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def test_same_seed_gives_identical_weights(pipe):
    assert_same_weights(pipe, tiny.build_tiny_pipeline(seed=0))


def test_different_seed_gives_different_weights(pipe):
    other = tiny.build_tiny_pipeline(seed=1)
    for name in COMPONENTS:
        sa, sb = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert any(not torch.equal(sa[k], sb[k]) for k in sa), name


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_pipeline(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_pipeline_shapes_and_attention(pipe):
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == tiny.TINY_RESOLUTION
    processors = pipe.unet.attn_processors
    assert processors and all(type(p).__name__ == "AttnProcessor2_0" for p in processors.values())
    assert pipe.text_encoder.config._attn_implementation == "sdpa"
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    images = sample(pipe)
    assert images.shape == (1, tiny.TINY_RESOLUTION, tiny.TINY_RESOLUTION, 3)
    assert np.isfinite(images).all()
    assert sample(pipe, height=32, width=48).shape == (1, 32, 48, 3)


def test_encode_prompt(pipe):
    embeds, negative = pipe.encode_prompt(tiny.TINY_CLASS_PROMPT, "cpu", 1, True, "blurry")
    assert embeds.shape == negative.shape == (1, 77, 32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_scheduler_config_feeds_training(prediction_type):
    pipe = tiny.build_tiny_pipeline(prediction_type=prediction_type)
    train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert train_scheduler.config.prediction_type == prediction_type
    assert train_scheduler.config.num_train_timesteps == 1000


def test_tokenizer_round_trip_and_padding():
    tok = tiny.build_tiny_tokenizer()
    prompt = "A photo of sks toy on the beach, Zebra-stripes 42!"
    ids = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tok.bos_token_id
    assert (
        tok.decode(ids[0], skip_special_tokens=True)
        == "a photo of sks toy on the beach , zebra - stripes 4 2 !"
    )
    length = len(tok(prompt).input_ids)
    assert ids[0, length - 1] == tok.eos_token_id
    assert (ids[0, length:] == tok.pad_token_id).all()
    # Corpus words are single tokens; the special tokens carry the largest ids (CLIP's pooling).
    assert tok.tokenize(tiny.TINY_INSTANCE_PROMPT) == ["a</w>", "photo</w>", "of</w>", "sks</w>", "toy</w>"]
    assert tok.eos_token_id == len(tok) - 1


def test_tokenizer_truncates_long_prompts():
    tok = tiny.build_tiny_tokenizer()
    ids = tok("word " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == tok.eos_token_id


def test_save_and_load_offline_gives_same_images(pipe, tmp_path, offline):
    path = tiny.save_tiny_pipeline(tmp_path / "tiny", seed=0)
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = StableDiffusionPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    assert_same_weights(pipe, loaded)
    assert np.array_equal(sample(pipe), sample(loaded))


def test_instance_images(tmp_path):
    paths = tiny.make_instance_images(tmp_path / "a", num_images=3, seed=0, resolution=32)
    assert len(paths) == 3
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
            arrays.append(np.asarray(image))
    assert not np.array_equal(arrays[0], arrays[1])
    again = tiny.make_instance_images(tmp_path / "b", num_images=3, seed=0, resolution=32)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert tiny.make_instance_images(tmp_path / "c", num_images=1)[0].stat().st_size > 0


def test_cached_path_is_built_once(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("BOFT_DIFFUSION_CACHE", str(tmp_path))
    path = tiny.tiny_pipeline_path()
    assert path == tmp_path / "tiny-sd-seed0"
    assert (path / "model_index.json").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("cache was rebuilt")

    monkeypatch.setattr(tiny, "save_tiny_pipeline", fail)
    assert tiny.tiny_pipeline_path() == path
    assert tiny.tiny_pipeline_path(cache_dir=tmp_path, seed=0) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd-seed0"]  # no staging left over
    StableDiffusionPipeline.from_pretrained(path)


def test_cached_path_rebuilds_stale_folder(tmp_path):
    target = tmp_path / "tiny-sd-seed0"
    target.mkdir()
    (target / "boft_tiny.json").write_text(json.dumps({"format_version": -1, "seed": 0}))
    assert tiny.tiny_pipeline_path(cache_dir=tmp_path) == target
    assert (target / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd-seed0"]


def test_cached_path_concurrent_builders(tmp_path):
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(tiny.tiny_pipeline_path(tmp_path, seed=2)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "tiny-sd-seed2"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd-seed2"]
    assert_same_weights(StableDiffusionPipeline.from_pretrained(results[0]), tiny.build_tiny_pipeline(seed=2))


def test_controlnet_from_tiny_unet(pipe):
    controlnet = tiny.build_tiny_controlnet(pipe, seed=0)
    again = tiny.build_tiny_controlnet(pipe.unet, seed=0)
    for key, value in controlnet.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(1, 77, 32)
    cond = torch.rand(1, 3, tiny.TINY_RESOLUTION, tiny.TINY_RESOLUTION)
    down, mid = controlnet(latents, 10, text, cond, return_dict=False)
    assert [d.shape[-1] for d in down] == [16, 16, 8, 8] and mid.shape == (1, 64, 8, 8)
