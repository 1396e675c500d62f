"""Tests for the embedded tiny pipeline: shipped weights, determinism, offline round trip, tokenizer, data, cache."""

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
    return tiny.build_tiny_pipeline(seed=0, weights="random")


@pytest.fixture(scope="module")
def learned() -> StableDiffusionPipeline:
    return tiny.build_tiny_pipeline()


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
    assert_same_weights(pipe, tiny.build_tiny_pipeline(seed=0, weights="random"))


def test_different_seed_gives_different_weights(pipe):
    other = tiny.build_tiny_pipeline(seed=1, weights="random")
    for name in COMPONENTS:
        sa, sb = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert any(not torch.equal(sa[k], sb[k]) for k in sa), name


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_pipeline(seed=5, weights="random")
    tiny.build_tiny_pipeline()
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
    pipe = tiny.build_tiny_pipeline(prediction_type=prediction_type, weights="random")
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
    path = tiny.save_tiny_pipeline(tmp_path / "tiny", seed=0, weights="random")
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
    assert path == tmp_path / "tiny-sd-world"
    assert (path / "model_index.json").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("cache was rebuilt")

    monkeypatch.setattr(tiny.sd, "save_tiny_pipeline", fail)
    assert tiny.tiny_pipeline_path() == path
    assert tiny.tiny_pipeline_path(cache_dir=tmp_path, seed=3) == path  # the seed is the random build's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd-world"]  # no staging left over
    loaded = StableDiffusionPipeline.from_pretrained(path)
    assert loaded.vae.config.scaling_factor == tiny.build_tiny_pipeline().vae.config.scaling_factor


def test_cached_path_rebuilds_stale_folder(tmp_path):
    target = tmp_path / "tiny-sd-random-seed0"
    target.mkdir()
    (target / "boft_tiny.json").write_text(json.dumps({"format_version": -1, "seed": 0}))
    assert tiny.tiny_pipeline_path(cache_dir=tmp_path, weights="random") == target
    assert (target / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd-random-seed0"]


def test_cached_path_concurrent_builders(tmp_path):
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(tiny.tiny_pipeline_path(tmp_path, seed=2, weights="random"))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "tiny-sd-random-seed2"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd-random-seed2"]
    built = tiny.build_tiny_pipeline(seed=2, weights="random")
    assert_same_weights(StableDiffusionPipeline.from_pretrained(results[0]), built)


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


# --- the shipped weights -------------------------------------------------------------------------


def test_shipped_weights_load_into_the_architecture(learned):
    assert tiny.TINY_WORLD_WEIGHTS.is_file()
    assert tiny.TINY_WORLD_WEIGHTS.stat().st_size < 20 * 2**20
    random = tiny.build_tiny_pipeline(seed=0, weights="random")
    for name in COMPONENTS:
        a, b = getattr(learned, name).state_dict(), getattr(random, name).state_dict()
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), name
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in a.values()), name
    assert learned.vae.config.scaling_factor != random.vae.config.scaling_factor  # measured at pretraining
    assert_same_weights(learned, tiny.build_tiny_pipeline(seed=7))  # the seed only matters for random


def test_learned_pipeline_refuses_v_prediction():
    with pytest.raises(ValueError, match="weights='random'"):
        tiny.build_tiny_pipeline(prediction_type="v_prediction")


def test_world_weights_round_trip_and_refusals(learned, tmp_path):
    path = tiny.save_world_weights(learned, tmp_path / "w.safetensors", metadata={"note": "x"})
    again = tiny.build_tiny_pipeline(weights=path)
    assert_same_weights(learned, again)  # the shipped weights are float16 already: exact
    with pytest.raises(FileNotFoundError, match="pretrain_tiny.py"):
        tiny.build_tiny_pipeline(weights=tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        tiny.build_tiny_pipeline(weights=garbage)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"unet.x": torch.zeros(1)}, str(other), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a tiny world weights file"):
        tiny.build_tiny_pipeline(weights=other)
    wrong = tmp_path / "wrong.safetensors"
    tensors = {f"unet.{k}": v for k, v in learned.unet.state_dict().items()}
    tensors["unet.conv_in.weight"] = torch.zeros(3, 3)
    meta = {"format": tiny.WORLD_WEIGHTS_FORMAT, "tiny_format_version": str(tiny.TINY_FORMAT_VERSION)}
    save_file(tensors, str(wrong), metadata={**meta, "scaling_factor": "1.0"})
    before = {k: v.clone() for k, v in learned.unet.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit the tiny vae|conv_in.weight has shape"):
        tiny.load_world_weights(learned, wrong)
    assert all(torch.equal(v, learned.unet.state_dict()[k]) for k, v in before.items())  # nothing changed


@pytest.mark.slow
def test_learned_pipeline_draws_the_world(learned):
    """The shipped model draws what a world caption asks, held-out colour-shape pairs included."""
    from boft_diffusion.metrics import world_prompt_accuracy

    seen = world_prompt_accuracy(learned, num_prompts=16, seed=1)
    held_out = world_prompt_accuracy(learned, num_prompts=16, held_out=True, seed=1)
    for accuracy in (seen, held_out):  # chance: 1/8 colours, 1/7 backgrounds, 1/2 sizes
        assert accuracy["colour"] >= 0.6 and accuracy["background"] >= 0.6, accuracy
        assert accuracy["size"] >= 0.6, accuracy
