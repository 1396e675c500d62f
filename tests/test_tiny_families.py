"""Tests for the tiny SDXL, SD3 and Flux pipelines: offline deterministic builds, stock generation, round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from boft_diffusion import tiny

FAMILIES = {
    "sdxl": (tiny.build_tiny_sdxl_pipeline, StableDiffusionXLPipeline),
    "sd3": (tiny.build_tiny_sd3_pipeline, StableDiffusion3Pipeline),
    "flux": (tiny.build_tiny_flux_pipeline, FluxPipeline),
}
LATENT_SHAPES = {
    "sdxl": (1, 4, 16, 16),  # 4 channels at TINY_RESOLUTION // 4
    "sd3": (1, 16, 16, 16),  # 16 channels at TINY_RESOLUTION // 4 (2x2 patches inside the transformer)
    "flux": (1, 64, 64),  # 16 x 16 x 16 latents packed 2x2: 64 tokens of 64 features
}
TEXT_ENCODERS = {
    "sdxl": {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection},
    "sd3": {
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
    },
    "flux": {"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel},
}
MAX_PARAMETERS = 5_000_000


def modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def states(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: module.state_dict() for name, module in modules(pipe).items()}


def sample(pipe, **kwargs) -> np.ndarray:
    """Two steps at the native size from a fixed generator: (1, 64, 64, 3) floats in [0, 1]."""
    kwargs = {"height": tiny.TINY_RESOLUTION, "width": tiny.TINY_RESOLUTION, "output_type": "np", **kwargs}
    generator = torch.Generator().manual_seed(0)
    return pipe(tiny.TINY_INSTANCE_PROMPT, num_inference_steps=2, generator=generator, **kwargs).images


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe(family):
    return FAMILIES[family][0](seed=0)


def test_build_is_deterministic_offline_and_leaves_global_rng(family, pipe):
    build, cls = FAMILIES[family]
    rng = torch.get_rng_state()
    again, other = build(seed=0), build(seed=1)
    assert torch.equal(torch.get_rng_state(), rng)

    assert type(pipe) is cls
    first, second, third = states(pipe), states(again), states(other)
    assert set(first) == set(second) == set(third)
    for name, state in first.items():
        assert state.keys() == second[name].keys()
        assert all(torch.equal(state[k], second[name][k]) for k in state), name
        assert not all(torch.equal(state[k], third[name][k]) for k in state), name
    for name, module in modules(pipe).items():
        assert not module.training, name
        assert sum(p.numel() for p in module.parameters()) < MAX_PARAMETERS, name
    for name, encoder_cls in TEXT_ENCODERS[family].items():
        assert type(getattr(pipe, name)) is encoder_cls


def test_stock_pipeline_generates(family, pipe):
    images = sample(pipe)
    assert images.shape == (1, tiny.TINY_RESOLUTION, tiny.TINY_RESOLUTION, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0
    assert np.array_equal(images, sample(pipe))  # same generator, same image
    assert tuple(sample(pipe, output_type="latent").shape) == LATENT_SHAPES[family]


def test_save_pretrained_round_trip(family, pipe, tmp_path):
    cls = FAMILIES[family][1]
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = cls.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)

    assert type(loaded) is cls
    for name, component in pipe.components.items():
        assert type(loaded.components[name]) is type(component), name
    saved, reloaded = states(pipe), states(loaded)
    assert saved.keys() == reloaded.keys()
    for name, state in saved.items():
        assert state.keys() == reloaded[name].keys()
        assert all(torch.equal(state[k], reloaded[name][k]) for k in state), name
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if name in pipe.components:
            old, new = getattr(pipe, name), getattr(loaded, name)
            assert type(new) is type(old) and new.model_max_length == old.model_max_length
            assert new(tiny.TINY_INSTANCE_PROMPT).input_ids == old(tiny.TINY_INSTANCE_PROMPT).input_ids

    # Equal weights, equal images up to float32 rounding: reloaded transformers weights are views of the
    # mmapped safetensors file, and a GEMM on a tensor that is not 64-byte aligned may round differently.
    np.testing.assert_allclose(sample(loaded), sample(pipe), rtol=0, atol=1e-5)


def test_t5_tokenizer_round_trip_eos_and_padding():
    tok = tiny.build_tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)

    prompt = "a photo of sks toy on a striped blue background."
    ids = tok(prompt).input_ids
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
    assert tok.unk_token_id not in ids
    assert len(ids) == len(prompt.split()) + 2  # one piece per corpus word, "." and </s>
    assert tok.decode(ids, skip_special_tokens=True) == prompt

    other = "A Zebra, 3 kites!"  # not in the corpus: spelled out piece by piece, still no <unk>
    other_ids = tok(other).input_ids
    assert tok.unk_token_id not in other_ids
    assert tok.decode(other_ids, skip_special_tokens=True) == other

    padded = tok([prompt, "a toy"], padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert tuple(padded.input_ids.shape) == (2, 24)
    assert padded.input_ids[0, : len(ids)].tolist() == ids
    assert (padded.input_ids[0, len(ids) :] == tok.pad_token_id).all()
    assert padded.attention_mask[0].sum().item() == len(ids)
    assert padded.input_ids[1, :3].tolist() == [*tok("a toy").input_ids[:2], tok.eos_token_id]

    truncated = tok(prompt, padding="max_length", max_length=5, truncation=True).input_ids
    assert len(truncated) == 5 and truncated[-1] == tok.eos_token_id
