"""FLUX.2 [klein] (``Flux2KleinPipeline``): the family's prompt conditioning, denoiser call and latents are
the stock pipeline's own, bit for bit; DreamBooth from the CLI trains, saves, reloads, merges and exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILY_FAST
from diffusers import Flux2KleinPipeline

from boft_diffusion import cli
from boft_diffusion.families import FLUX2, UnsupportedFamilyError, family_of, get_family
from boft_diffusion.io import AdapterFormatError, load_boft_weights, read_adapter
from boft_diffusion.pipeline import merge_boft
from boft_diffusion.tiny import build_tiny_flux2_pipeline, build_tiny_flux_pipeline, build_tiny_pipeline

PROMPT = "a photo of sks toy"
QUICK = FAMILY_FAST


@pytest.fixture(scope="module")
def pipe() -> Flux2KleinPipeline:
    return build_tiny_flux2_pipeline()


def _images(pipe, seed=0) -> np.ndarray:
    return pipe(
        prompt=[PROMPT], num_inference_steps=2, generator=torch.Generator().manual_seed(seed), height=64,
        width=64, output_type="np",
    ).images  # fmt: skip


def test_a_klein_pipeline_and_its_components_are_flux2_and_flux2_dev_components_are_not(pipe):
    assert type(pipe) is Flux2KleinPipeline and family_of(pipe) is FLUX2 and get_family("flux2") is FLUX2
    assert family_of({n: getattr(pipe, n) for n in FLUX2.components}) is FLUX2  # a bare component mapping
    # FLUX.2 [dev]'s components: the same transformer class, another text encoder (here a CLIP stand-in)
    other = build_tiny_pipeline(weights="random").text_encoder
    with pytest.raises(UnsupportedFamilyError):
        family_of({"transformer": pipe.transformer, "text_encoder": other})
    assert FLUX2.trained_text_encoders == () and FLUX2.objective == "flow"


def test_the_tiny_build_is_deterministic_from_its_seed_and_leaves_the_global_rng(pipe):
    rng = torch.random.get_rng_state()
    again, other = build_tiny_flux2_pipeline(seed=0), build_tiny_flux2_pipeline(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for name in ("transformer", "vae", "text_encoder"):
        mine, same, different = (getattr(p, name).state_dict() for p in (pipe, again, other))
        assert all(torch.equal(v, same[k]) for k, v in mine.items())
        assert any(v.is_floating_point() and not torch.equal(v, different[k]) for k, v in mine.items())
    assert again.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()


def test_conditioning_is_flux2_klein_encode_prompt_bit_for_bit(pipe):
    """Chat template, Qwen3 hidden states 9, 18, 27 stacked, text ids: Flux2KleinPipeline.encode_prompt."""
    prompts = [PROMPT, "a red toy on a wooden table, studio lighting"]
    batch = FLUX2.tokenize(pipe, prompts)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 512)
    cond = FLUX2.encode_prompt({"text_encoder": pipe.text_encoder}, batch, "cpu")
    embeds, text_ids = pipe.encode_prompt(prompts, device="cpu")
    assert embeds.shape == (2, 512, 96)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    assert torch.equal(cond["txt_ids"], text_ids)


def test_denoiser_call_is_the_pipelines_own(pipe):
    """One step of the stock pipeline, its transformer call recorded: the family's call on the same noisy
    latents, timestep and prompt gives the same prediction, bit for bit (packing, position ids, t / 1000,
    no guidance embedding)."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((kwargs, output[0]))

    latents = torch.randn(1, 64, 8, 8, generator=torch.Generator().manual_seed(1))
    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(prompt=PROMPT, latents=latents, num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
             output_type="latent")  # fmt: skip
    finally:
        handle.remove()
    (kwargs, stock), t = calls[0], pipe.scheduler.timesteps[:1]
    assert kwargs["guidance"] is None and not pipe.transformer.config.guidance_embeds
    cond = FLUX2.encode_prompt({"text_encoder": pipe.text_encoder}, FLUX2.tokenize(pipe, [PROMPT]), "cpu")
    pred = FLUX2.denoise(pipe.transformer, latents, t, cond, guidance_scale=3.5)
    assert pred.shape == latents.shape
    ids = pipe._prepare_latent_ids(latents)
    torch.testing.assert_close(pred, pipe._unpack_latents_with_ids(stock, ids, 8, 8), rtol=0, atol=0)


def test_latents_are_what_the_pipeline_encodes_and_decodes(pipe):
    """Posterior mode, 2x2 patches, VAE batch-norm normalisation: the pipeline's own image encoding; handed
    to the pipeline as its final latents, it un-normalises and unpatchifies them back to the VAE's."""
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = FLUX2.encode_latents(pipe.vae, pixels)
        raw = pipe.vae.encode(pixels).latent_dist.mode()
        stock = pipe._encode_vae_image(pixels, generator=None)
    assert latents.shape == (2, 64, 8, 8)
    torch.testing.assert_close(latents, stock, rtol=0, atol=0)
    assert not torch.allclose(latents, pipe._patchify_latents(raw))  # the normalisation is not a no-op

    def final_latents(pipeline, step, t, tensors):
        return {"latents": pipeline._pack_latents(latents)}

    decoded = pipe(
        prompt=[PROMPT] * 2, num_inference_steps=1, guidance_scale=1.0, height=64, width=64, output_type="latent",
        callback_on_step_end=final_latents,
    ).images  # fmt: skip
    torch.testing.assert_close(decoded, raw, rtol=1e-5, atol=1e-5)


def test_dreambooth_on_tiny_flux2_trains_saves_reloads_merges_and_exports(tmp_path):
    """From the CLI: BOFT on the transformer's default targets (Qwen3 stays frozen); the adapter records
    flux2, loads into a fresh stock pipeline with identical samples, is refused by FLUX.1 naming both
    families, merges, and the merged export opens as a stock Flux2KleinPipeline."""
    out = tmp_path / "run"
    args = [
        "train",
        "dreambooth",
        f"train.output_dir={out}",
        "model.tiny_family=flux2",
        "model.tiny_weights=random",
    ]
    args += [*QUICK, "train.export_merged=true", "boft.train_text_encoder=true"]
    assert cli.main(args) == 0
    adapter = read_adapter(out)
    assert adapter.metadata["family"] == "flux2"
    assert set(adapter.configs) == {"transformer"}
    adapted = {key.rsplit(".", 1)[0] for key in adapter.tensors["transformer"]}
    for layer in (
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
        "single_transformer_blocks.1.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out",
    ):  # fmt: skip
        assert any(key.startswith(layer + ".") or key == layer for key in adapted), layer
    trained = build_tiny_flux2_pipeline()
    base = _images(trained)
    load_boft_weights(trained, out)
    after = _images(trained)
    assert not np.array_equal(after, base)
    fresh = build_tiny_flux2_pipeline()
    load_boft_weights(fresh, out)
    assert np.array_equal(_images(fresh), after)
    with pytest.raises(AdapterFormatError, match=r"FLUX\.2 \[klein\] \(flux2\).*FLUX\.1 \(flux\)"):
        load_boft_weights(build_tiny_flux_pipeline(), out)
    merge_boft(fresh)
    assert np.abs(_images(fresh) - after).max() < 1e-2
    exported = Flux2KleinPipeline.from_pretrained(Path(out) / "merged")
    exported.set_progress_bar_config(disable=True)
    assert np.abs(_images(exported) - after).max() < 1e-2
