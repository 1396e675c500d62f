"""Merged single-file export of SD 2.x: the text encoder in the original OpenCLIP layout.

SD 2.x's text encoder is OpenCLIP ViT-H (``hidden_act="gelu"``), which the original checkpoints hold as
``cond_stage_model.model.*`` in open_clip form (q, k, v fused into ``attn.in_proj_*``). A tiny SD 2.x-shaped
pipeline (OpenCLIP-like text encoder, linear-projection UNet with per-block head counts, v-prediction
DDIM as SD 2.1) exports a file that ``StableDiffusionPipeline.from_single_file(file, config=<its diffusers
folder>)`` reads back offline to exactly the merged weights, and so to identical images.

diffusers tells v2 from v1 by the width of ``input_blocks.2.1...attn2.to_k.weight`` (1024: OpenCLIP-H);
the tiny UNet's is the tiny text width, so
:func:`test_sd21_shapes_are_detected_as_v2_and_invert_diffusers_converters` checks detection on full-size
SD 2.1 shapes (meta tensors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import sample_images
from safetensors import safe_open

from boft_diffusion import BOFTConfig, add_boft_to_pipeline
from boft_diffusion.export import export_merged, merged_state_dict, to_original_layout
from boft_diffusion.families.keys.sd import CLIP_PREFIX, OPEN_CLIP_PREFIX, is_open_clip
from boft_diffusion.inject import boft_layers
from boft_diffusion.tiny import MAX_TOKENS, TINY_RESOLUTION, build_tiny_pipeline, build_tiny_tokenizer

STEPS = 2
UNET = BOFTConfig(boft_block_size=0, boft_block_num=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
TEXT = BOFTConfig(boft_block_size=4, init_weights=False)
COMPONENTS = ("unet", "vae", "text_encoder")
PREFIXES = ("model.diffusion_model.", "first_stage_model.", OPEN_CLIP_PREFIX)
TEXT_WIDTH = 48
TEXT_LAYERS = 2


def build_tiny_sd2_pipeline(seed: int = 0):
    """A tiny randomly initialised SD 2.x-shaped pipeline, deterministic from ``seed`` (global RNG untouched).

    As SD 2.1: an OpenCLIP-like ``CLIPTextModel`` (exact GELU), a UNet with per-block head counts as
    ``attention_head_dim``, ``use_linear_projection`` and ``upcast_attention``, cross-attention as wide as
    the text, and v-prediction DDIM; two layers per block, so the block diffusers detects v2 by exists.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
            cross_attention_dim=TEXT_WIDTH,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=TINY_RESOLUTION,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_WIDTH,
                intermediate_size=64,
                projection_dim=32,
                num_hidden_layers=TEXT_LAYERS,
                num_attention_heads=4,
                max_position_embeddings=MAX_TOKENS,
                hidden_act="gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapted_pipe():
    """The tiny SD 2.x pipeline with non-identity BOFT adapters on the UNet and the text encoder."""
    pipe = build_tiny_sd2_pipeline(seed=0)
    add_boft_to_pipeline(pipe, {"unet": UNET, "text_encoder": TEXT}, "toy")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in boft_layers(pipe.unet).values():
            for tensor in (layer.boft_R["toy"], layer.boft_s["toy"]):
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return pipe


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The adapter pipeline, its merged diffusers export, its single file and that file read by diffusers."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd2")
    base = build_tiny_sd2_pipeline(seed=0)
    base.save_pretrained(root / "base", safe_serialization=True)
    pipe = adapted_pipe()
    file = export_merged(pipe, root / "merged.safetensors", format="single_file")
    export_merged(pipe, root / "merged")
    loaded = StableDiffusionPipeline.from_single_file(
        str(file), config=str(root / "base"), local_files_only=True
    )
    merged = StableDiffusionPipeline.from_pretrained(root / "merged", local_files_only=True)
    for p in (loaded, merged):
        p.set_progress_bar_config(disable=True)
    return {"base": base, "pipe": pipe, "file": file, "loaded": loaded, "merged": merged}


def test_the_tiny_pipeline_is_sd2_shaped_and_deterministic():
    state = torch.random.get_rng_state()
    a, b = build_tiny_sd2_pipeline(seed=0), build_tiny_sd2_pipeline(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    for comp in COMPONENTS:
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp
    assert is_open_clip(a.text_encoder.config)
    assert not is_open_clip(build_tiny_pipeline(seed=0, weights="random").text_encoder.config)
    assert a.scheduler.config.prediction_type == "v_prediction"
    assert a.unet.config.use_linear_projection and list(a.unet.config.attention_head_dim) == [2, 4]


def test_single_file_loads_back_the_merged_weights(export):
    pipe, loaded = export["pipe"], export["loaded"]
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    for comp in COMPONENTS:
        merged = merged_state_dict(getattr(pipe, comp))
        state = getattr(loaded, comp).state_dict()
        assert merged.keys() == state.keys(), comp
        bad = [k for k in merged if not torch.equal(state[k], merged[k])]
        assert not bad, (comp, bad[:5])
    for comp in ("unet", "text_encoder"):  # both adapters are merged, neither is the identity
        base, merged = getattr(export["base"], comp).state_dict(), merged_state_dict(getattr(pipe, comp))
        assert any(not torch.equal(base[k], merged[k]) for k in base), comp


def test_single_file_images_equal_the_merged_pipeline(export):
    merged = sample_images(export["merged"], steps=STEPS)
    single = sample_images(export["loaded"], steps=STEPS)
    assert np.array_equal(single, merged)
    assert np.array_equal(
        sample_images(export["loaded"], seed=3, steps=STEPS),
        sample_images(export["merged"], seed=3, steps=STEPS),
    )
    base = sample_images(export["base"], steps=STEPS)
    assert np.abs(merged - base).max() > 0.01  # the adapters change the images


def test_single_file_keys_are_the_open_clip_layout(export):
    with safe_open(export["file"], framework="pt") as f:
        keys = set(f.keys())
        in_proj = f.get_tensor(OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight")
        in_bias = f.get_tensor(OPEN_CLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_bias")
        meta = f.metadata()
    assert all(k.startswith(PREFIXES) for k in keys), sorted(k for k in keys if not k.startswith(PREFIXES))
    assert all(any(k.startswith(p) for k in keys) for p in PREFIXES)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    text = {k.removeprefix(OPEN_CLIP_PREFIX) for k in keys if k.startswith(OPEN_CLIP_PREFIX)}
    block = {"attn.in_proj_weight", "attn.in_proj_bias"} | {
        f"{m}.{p}"
        for m in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")
    }
    expected = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"} | {
        f"transformer.resblocks.{n}.{k}" for n in range(TEXT_LAYERS) for k in block
    }
    # one block per layer the encoder has; no text_projection (a CLIPTextModel has none)
    assert text == expected
    assert in_proj.shape == (3 * TEXT_WIDTH, TEXT_WIDTH)
    encoder = {
        k.removeprefix("text_model."): t for k, t in merged_state_dict(export["pipe"].text_encoder).items()
    }
    qkv = [encoder[f"encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(in_proj, torch.cat(qkv))  # q, k, v stacked in that order
    assert torch.equal(
        in_bias, torch.cat([encoder[f"encoder.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"])
    )
    # diffusers' OpenCLIP marker; the v2 marker exists (tiny width, so diffusers calls the tiny file v1)
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    assert CHECKPOINT_KEY_NAMES["open_clip"] in keys
    assert CHECKPOINT_KEY_NAMES["v2"] in keys
    assert meta["format"] == "pt" and meta["boft_diffusion.adapters"] == "toy:1"


def test_sd1_text_encoder_keeps_the_clip_layout():
    pipe = build_tiny_pipeline(seed=0, weights="random")
    states = [pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict()]
    configs = (pipe.unet.config, pipe.vae.config)
    ckpt = to_original_layout(*states, *configs, pipe.text_encoder.config)
    assert ckpt.keys() == to_original_layout(*states, *configs).keys()
    text = [k for k in ckpt if k.startswith("cond_stage_model.")]
    assert text and all(k.startswith(CLIP_PREFIX) for k in text)


def test_a_text_encoder_key_without_an_open_clip_place_is_a_clear_refusal():
    pipe = build_tiny_sd2_pipeline(seed=0)
    states = [dict(getattr(pipe, c).state_dict()) for c in COMPONENTS]
    configs = (pipe.unet.config, pipe.vae.config, pipe.text_encoder.config)
    states[2]["encoder.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"text_encoder key .*self_attn\.extra\.weight.*Stable Diffusion layout"
    ):
        to_original_layout(*states, *configs)


def test_sd21_shapes_are_detected_as_v2_and_invert_diffusers_converters():
    """SD-2.1-shaped UNet, VAE and OpenCLIP-H text encoder (meta tensors, diffusers' SD 2.1 configs): the
    file is detected as ``v2`` and diffusers' own converters give back every tensor of every component."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
        text_encoder = CLIPTextModel(  # stabilityai/stable-diffusion-2-1 text_encoder/config.json
            CLIPTextConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,
                num_attention_heads=16,
                projection_dim=512,
                hidden_act="gelu",
            )
        )
    states = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text": text_encoder.state_dict()}
    ckpt = to_original_layout(
        states["unet"], states["vae"], states["text"], unet.config, vae.config, text_encoder.config
    )
    assert infer_diffusers_model_type(ckpt) == "v2"
    for key, shape in {  # well-known SD 2.1 checkpoint keys
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),  # linear, not 1x1 conv
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320),
        OPEN_CLIP_PREFIX + "token_embedding.weight": (49408, 1024),
        OPEN_CLIP_PREFIX + "positional_embedding": (77, 1024),
        OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        OPEN_CLIP_PREFIX + "transformer.resblocks.22.attn.in_proj_bias": (3072,),
        OPEN_CLIP_PREFIX + "transformer.resblocks.22.attn.out_proj.weight": (1024, 1024),
        OPEN_CLIP_PREFIX + "transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        OPEN_CLIP_PREFIX + "transformer.resblocks.22.mlp.c_proj.weight": (1024, 4096),
        OPEN_CLIP_PREFIX + "transformer.resblocks.22.ln_2.bias": (1024,),
        OPEN_CLIP_PREFIX + "ln_final.weight": (1024,),
    }.items():
        assert tuple(ckpt[key].shape) == shape, key
    # diffusers' SD 2.x text encoder is OpenCLIP's first 23 blocks (the penultimate layer's output)
    assert not any(".resblocks.23." in k for k in ckpt)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in ckpt)

    back = convert_ldm_unet_checkpoint(ckpt, unet.config)
    assert back.keys() == states["unet"].keys()
    assert all(back[k] is states["unet"][k] for k in back)
    back = convert_ldm_vae_checkpoint(ckpt, vae.config)
    assert back.keys() == states["vae"].keys()
    back = convert_open_clip_checkpoint(text_encoder, ckpt, prefix=OPEN_CLIP_PREFIX)
    back = {k.removeprefix("text_model."): t for k, t in back.items()}
    text = {k.removeprefix("text_model."): t for k, t in states["text"].items() if "position_ids" not in k}
    assert back.keys() == text.keys()
    assert all(back[k].shape == text[k].shape for k in back)


def test_open_clip_layout_is_the_exact_inverse_of_diffusers_converter():
    """Real tensors through diffusers' ``convert_open_clip_checkpoint``: every text-encoder tensor back, bit for bit."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    pipe = build_tiny_sd2_pipeline(seed=0)
    state = {k.removeprefix("text_model."): t for k, t in pipe.text_encoder.state_dict().items()}
    ckpt = to_original_layout({}, {}, state, pipe.unet.config, pipe.vae.config, pipe.text_encoder.config)
    back = convert_open_clip_checkpoint(pipe.text_encoder, ckpt, prefix=OPEN_CLIP_PREFIX)
    back = {k.removeprefix("text_model."): t for k, t in back.items()}
    state = {k: t for k, t in state.items() if "position_ids" not in k}
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
