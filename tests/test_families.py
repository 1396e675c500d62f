"""The family layer: which family a pipeline is, how each encodes prompts and calls its denoiser, and
DreamBooth, adapter files, merge and export on every family through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILY_FAST

from boft_diffusion import cli
from boft_diffusion.config import BOFTConfig
from boft_diffusion.families import (
    FAMILIES,
    FLUX,
    SD,
    SD3,
    SDXL,
    UnsupportedFamilyError,
    family_of,
    get_family,
)
from boft_diffusion.io import AdapterFormatError, load_boft_weights, read_adapter, save_boft_weights
from boft_diffusion.pipeline import add_boft_to_pipeline, merge_boft
from boft_diffusion.tiny import (
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
)

QUICK = FAMILY_FAST


def _images(pipe, prompt="a photo of sks toy", seed=0) -> np.ndarray:
    return pipe(
        [prompt], num_inference_steps=2, generator=torch.Generator().manual_seed(seed), height=64, width=64,
        output_type="np",
    ).images  # fmt: skip


def test_each_tiny_pipeline_is_of_its_family_and_unknown_ones_are_named():
    assert family_of(build_tiny_pipeline(weights="random")) is SD
    assert family_of(build_tiny_sdxl_pipeline()) is SDXL
    assert family_of(build_tiny_sd3_pipeline()) is SD3 and family_of(build_tiny_flux_pipeline()) is FLUX
    flux = build_tiny_flux_pipeline()
    assert family_of({n: getattr(flux, n) for n in FLUX.components}) is FLUX  # a bare component mapping
    assert get_family("sdxl") is SDXL and set(FAMILIES) >= {"sd", "sdxl"}
    with pytest.raises(
        UnsupportedFamilyError, match=r"object is not a pipeline .* sd \(Stable Diffusion 1.x/2.x"
    ):
        family_of(object())
    with pytest.raises(UnsupportedFamilyError, match="unknown model family 'flux3'; supported: sd"):
        get_family("flux3")


def test_sd_conditioning_and_denoiser_call_are_the_pipelines():
    pipe = build_tiny_pipeline(weights="random")
    batch = SD.tokenize(pipe, ["a photo of sks toy"])
    cond = SD.encode_prompt({"text_encoder": pipe.text_encoder}, batch, "cpu")
    expected = pipe.encode_prompt("a photo of sks toy", "cpu", 1, False)[0]
    torch.testing.assert_close(cond["encoder_hidden_states"], expected, rtol=0, atol=0)
    latents, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    direct = pipe.unet(latents, t, expected).sample
    torch.testing.assert_close(SD.denoise(pipe.unet, latents, t, cond), direct, rtol=0, atol=0)


def test_sdxl_conditioning_is_the_stock_pipelines():
    """Two encoders' penultimate states concatenated, the second's pooled projection, the size time ids:
    what StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids give."""
    pipe = build_tiny_sdxl_pipeline()
    batch = {**SDXL.tokenize(pipe, ["a photo of sks toy"]), "pixel_values": torch.zeros(1, 3, 64, 64)}
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    cond = SDXL.encode_prompt(encoders, batch, "cpu")
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a photo of sks toy", device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled, rtol=0, atol=0)
    projection_dim = pipe.text_encoder_2.config.projection_dim
    stock = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, projection_dim)
    torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], stock, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_families_condition_and_call_their_denoiser_as_the_stock_pipelines(family):
    """SD3: both CLIPs' penultimate states padded to T5's width, then T5, pooled CLIP projections; Flux: CLIP
    pooled, T5 states, packed latents, timestep / 1000 and the guidance embedding, as the pipeline calls it."""
    build, fam, key = {
        "sd3": (build_tiny_sd3_pipeline, SD3, "input_ids_3"), "flux": (build_tiny_flux_pipeline, FLUX, "input_ids_2"),
    }[family]  # fmt: skip
    pipe = build()
    batch = fam.tokenize(pipe, ["a photo of sks toy"])
    cond = fam.encode_prompt({n: getattr(pipe, n) for n in fam.text_encoders}, batch, "cpu")
    length = batch[key].shape[1]
    if fam is SD3:
        embeds, _, pooled, _ = pipe.encode_prompt(
            "a photo of sks toy", None, None, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=length,
        )  # fmt: skip
    else:
        embeds, pooled, _ = pipe.encode_prompt(
            "a photo of sks toy", None, device="cpu", max_sequence_length=length
        )
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    channels = pipe.transformer.config.in_channels // (4 if fam is FLUX else 1)
    latents, t = torch.randn(2, channels, 16, 16), torch.tensor([500.0, 20.0])
    cond2 = {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}
    pred = fam.denoise(pipe.transformer, latents, t, cond2, guidance_scale=3.5)
    assert pred.shape == latents.shape
    if fam is FLUX:  # the pipeline's own call, packed
        packed = pipe._pack_latents(latents, 2, channels, 16, 16)
        ids = pipe._prepare_latent_image_ids(2, 8, 8, "cpu", latents.dtype)
        stock = pipe.transformer(
            hidden_states=packed, timestep=t / 1000, guidance=torch.full((2,), 3.5),
            pooled_projections=cond2["pooled_projections"], encoder_hidden_states=cond2["encoder_hidden_states"],
            txt_ids=torch.zeros(length, 3), img_ids=ids, return_dict=False,
        )[0]  # fmt: skip
        torch.testing.assert_close(
            pred, pipe._unpack_latents(stock, 64, 64, pipe.vae_scale_factor), rtol=0, atol=0
        )


def test_a_config_key_of_another_family_is_refused_before_anything_is_written(tmp_path, capsys):
    cases = [
        (
            ["model.tiny_family=sd3", "model.tiny_weights=random", "train.snr_gamma=5"],
            "train.snr_gamma is for DDPM",
        ),
        (
            ["model.tiny_weights=random", "train.weighting_scheme=logit_normal"],
            "is for flow-matching families",
        ),
        (
            ["model.tiny_weights=random", "boft.transformer_target_modules=[to_q]"],
            "is for transformer families",
        ),
    ]
    for overrides, message in cases:
        out = tmp_path / "run"
        assert cli.main(["train", "dreambooth", f"train.output_dir={out}", *QUICK, *overrides]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_an_adapter_of_one_family_is_refused_by_another_naming_both(tmp_path):
    sd = build_tiny_pipeline(weights="random")
    add_boft_to_pipeline(
        sd, {"unet": BOFTConfig(boft_block_size=0, boft_block_num=4, target_modules=["to_q"])}
    )
    save_boft_weights(sd, tmp_path / "a", metadata={"family": "sd"})
    sdxl = build_tiny_sdxl_pipeline()
    before = {k: v.clone() for k, v in sdxl.unet.state_dict().items()}
    with pytest.raises(
        AdapterFormatError,
        match=r"trained on a Stable Diffusion 1.x/2.x \(sd\).*Stable Diffusion XL \(sdxl\)",
    ):
        load_boft_weights(sdxl, tmp_path / "a")
    assert all(torch.equal(v, sdxl.unet.state_dict()[k]) for k, v in before.items())
    save_boft_weights(sd, tmp_path / "b", metadata={"family": "flux3"})
    with pytest.raises(AdapterFormatError, match="unknown model family 'flux3'"):
        load_boft_weights(build_tiny_pipeline(weights="random"), tmp_path / "b")


FAMILY_RUNS = {
    # family: (build, stock pipeline class, components the adapter holds, extra overrides)
    "sdxl": (build_tiny_sdxl_pipeline, "StableDiffusionXLPipeline", {"unet", "text_encoder", "text_encoder_2"}, []),
    "sd3": (build_tiny_sd3_pipeline, "StableDiffusion3Pipeline", {"transformer", "text_encoder", "text_encoder_2"},
            ["train.weighting_scheme=logit_normal"]),
    "flux": (build_tiny_flux_pipeline, "FluxPipeline", {"transformer", "text_encoder"}, []),
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILY_RUNS))
def test_dreambooth_on_each_tiny_family_trains_saves_reloads_merges_and_exports(tmp_path, family):
    """From the CLI: BOFT on the denoiser and the family's trainable text encoders (T5 stays frozen); the
    adapter records its family, loads into a fresh stock pipeline with identical samples, merges, and the
    merged export opens in stock diffusers."""
    import diffusers

    build, pipeline_class, components, extra = FAMILY_RUNS[family]
    out = tmp_path / "run"
    args = [
        "train",
        "dreambooth",
        f"train.output_dir={out}",
        f"model.tiny_family={family}",
        "model.tiny_weights=random",
    ]
    args += [*QUICK, *extra, "train.export_merged=true", "boft.train_text_encoder=true"]
    assert cli.main(args) == 0  # the CLI in-process (a subprocess per family would double the time)
    adapter = read_adapter(out)
    assert adapter.metadata["family"] == family
    assert set(adapter.configs) == components
    trained = build()
    base = _images(trained)
    load_boft_weights(trained, out)
    after = _images(trained)
    assert not np.array_equal(after, base)
    fresh = build()
    load_boft_weights(fresh, out)
    assert np.array_equal(_images(fresh), after)
    merge_boft(fresh)
    assert np.abs(_images(fresh) - after).max() < 1e-2
    exported = getattr(diffusers, pipeline_class).from_pretrained(Path(out) / "merged")
    exported.set_progress_bar_config(disable=True)
    assert np.abs(_images(exported) - after).max() < 1e-2


def test_controllable_generation_on_tiny_sdxl(tmp_path):
    """SDXL's ControlNetModel (from its UNet, text-time conditioning included): trains from the CLI, reloads
    into a fresh stock SDXL pipeline with identical conditioned samples (through the stock
    StableDiffusionXLControlNetPipeline), and merges. (Light mode shares this path but for the encoder's
    hook on conv_in, which does not depend on the family; one mode keeps the suite short.)"""
    mode = "controlnet"
    from boft_diffusion.control import sample_with_control
    from boft_diffusion.metrics import world_control_cases

    out = tmp_path / "run"
    args = [
        "train",
        "controlnet",
        f"train.output_dir={out}",
        f"control.mode={mode}",
        "model.tiny_family=sdxl",
    ]
    args += [
        "model.tiny_weights=random",
        "metrics.detector=none",
        "train.max_train_steps=2",
        "train.snr_gamma=null",
    ]
    args += ["data.num_generated_examples=8", "validation.validation_steps=0", "train.checkpointing_steps=0"]
    assert cli.main([*args, "train.report_to=none", "train.export_merged=true"]) == 0
    assert read_adapter(out).metadata["family"] == "sdxl"
    cases = world_control_cases(2)

    def samples(pipe):
        images = sample_with_control(
            pipe, [c.prompt for c in cases], [c.condition for c in cases], [0, 1], num_inference_steps=2
        )
        return np.stack([np.asarray(im, dtype=np.float32) for im in images])

    fresh = build_tiny_sdxl_pipeline()
    load_boft_weights(fresh, out)
    again = build_tiny_sdxl_pipeline()
    load_boft_weights(again, out)
    first = samples(fresh)
    assert np.array_equal(samples(again), first)
    merge_boft(fresh)
    assert np.abs(samples(fresh) - first).max() <= 2  # uint8 pixels: the merge's float rounding
    assert (out / "merged" / "controlnet" / "config.json").is_file()
