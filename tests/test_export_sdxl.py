"""Merged single-file export of SDXL: the original (Stability ``sgm``) layout, on the tiny SDXL pipeline.

The file loads with ``StableDiffusionXLPipeline.from_single_file(file, config=<base folder>)`` offline and
gives back exactly the merged weights (every original-layout tensor is a rename, a q/k/v concatenation
or a transpose: no arithmetic). Images: within 1e-4 (max abs, pixels in [0, 1]) of the adapter pipeline's,
as for SD.

diffusers tells SDXL base from other checkpoints by ``conditioner.embedders.1.model.transformer.
resblocks.9.mlp.c_proj.bias`` (a tenth OpenCLIP-G block): the tiny second text encoder has two blocks,
so :func:`test_sdxl_base_shapes_are_detected_and_invert_diffusers_converters` checks detection on a
full-size SDXL base (meta tensors); the tiny file loads because ``config=`` names its diffusers folder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import sample_images
from safetensors import safe_open

from boft_diffusion import BOFTConfig, add_boft_to_pipeline
from boft_diffusion.export import export_merged, merged_state_dict
from boft_diffusion.families.keys.sdxl import CLIP_G_PREFIX, CLIP_L_PREFIX, to_sdxl_original_layout
from boft_diffusion.inject import boft_layers
from boft_diffusion.tiny import TINY_TEXT_CONFIG_2, build_tiny_sdxl_pipeline

IMAGE_TOLERANCE = 1e-4
STEPS = 2
UNET = BOFTConfig(boft_block_size=0, boft_block_num=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
TEXT = BOFTConfig(boft_block_size=4, init_weights=False)
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PREFIXES = ("model.diffusion_model.", "first_stage_model.", CLIP_L_PREFIX, CLIP_G_PREFIX)


def adapted_pipe():
    """The tiny SDXL pipeline with a UNet adapter (perturbed: not the identity) and a text_encoder_2 one."""
    pipe = build_tiny_sdxl_pipeline(seed=0)
    add_boft_to_pipeline(pipe, {"unet": UNET, "text_encoder_2": TEXT}, "toy")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in boft_layers(pipe.unet).values():
            for tensor in (layer.boft_R["toy"], layer.boft_s["toy"]):
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return pipe


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The adapter pipeline, its images, its single-file export and that file loaded by stock diffusers."""
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("sdxl")
    base = build_tiny_sdxl_pipeline(seed=0)
    base.save_pretrained(root / "base", safe_serialization=True)
    pipe = adapted_pipe()
    file = export_merged(pipe, root / "merged.safetensors", format="single_file")
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(file), config=str(root / "base"), local_files_only=True
    )
    loaded.set_progress_bar_config(disable=True)
    return {"base": base, "pipe": pipe, "file": file, "loaded": loaded, "root": root}


def test_single_file_loads_back_the_merged_weights(export):
    pipe, loaded = export["pipe"], export["loaded"]
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    base_q = export["base"].unet.state_dict()[
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    ]
    for comp in COMPONENTS:
        merged = merged_state_dict(getattr(pipe, comp))
        state = getattr(loaded, comp).state_dict()
        assert merged.keys() == state.keys(), comp
        bad = [k for k in merged if not torch.equal(state[k], merged[k])]
        assert not bad, (comp, bad[:5])
    merged_q = merged_state_dict(pipe.unet)[
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    ]
    assert not torch.equal(merged_q, base_q)  # the UNet adapter is merged, not the identity


def test_single_file_images_match_the_adapter_pipeline(export):
    reference = sample_images(export["pipe"], steps=STEPS)
    base = sample_images(export["base"], steps=STEPS)
    single = sample_images(export["loaded"], steps=STEPS)
    assert np.abs(reference - base).max() > 0.01  # the adapters change the images
    assert np.abs(single - reference).max() < IMAGE_TOLERANCE


def test_single_file_keys_are_the_sgm_layout(export):
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    with safe_open(export["file"], framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        projection = f.get_tensor(CLIP_G_PREFIX + "text_projection")
        in_proj = f.get_tensor(CLIP_G_PREFIX + "transformer.resblocks.1.attn.in_proj_weight")
    assert all(k.startswith(PREFIXES) for k in keys), sorted(k for k in keys if not k.startswith(PREFIXES))
    assert all(any(k.startswith(p) for k in keys) for p in PREFIXES)
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    # the markers diffusers detects the SDXL text encoders by, and the added text-time embedding
    assert CHECKPOINT_KEY_NAMES["clip_sdxl"] in keys
    assert CHECKPOINT_KEY_NAMES["open_clip_sdxl"] in keys
    assert {f"model.diffusion_model.label_emb.0.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} <= keys
    # xl_base's marker, one block per OpenCLIP-G layer (the tiny encoder has 2, SDXL's 32)
    marker = CHECKPOINT_KEY_NAMES["xl_base"]
    layers = TINY_TEXT_CONFIG_2["num_hidden_layers"]
    assert {marker.replace("resblocks.9.", f"resblocks.{n}.") for n in range(layers)} <= keys
    assert not any(".self_attn." in k or "layers." in k for k in keys if k.startswith(CLIP_G_PREFIX))
    assert not any(k.startswith("model.diffusion_model.add_embedding") for k in keys)
    # open_clip stores x @ P (the Linear weight transposed) and q, k, v stacked in that order
    encoder = merged_state_dict(export["pipe"].text_encoder_2)
    assert torch.equal(projection, encoder["text_projection.weight"].T)
    qkv = [encoder[f"text_model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(in_proj, torch.cat(qkv))
    assert meta["format"] == "pt" and meta["boft_diffusion.adapters"] == "toy:1"


def test_reduced_precision_single_file(export, tmp_path):
    export_merged(export["pipe"], tmp_path / "half.safetensors", format="single_file", dtype="fp16")
    with safe_open(tmp_path / "half.safetensors", framework="pt") as f, safe_open(export["file"], "pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.safetensors"]  # no temporaries


def test_pipelines_no_layout_fits_are_refused(tmp_path):
    from boft_diffusion.tiny import build_tiny_sd3_pipeline

    supported = (
        r"single_file export writes Stable Diffusion 1\.x/2\.x checkpoints \(unet, vae, text_encoder\), "
        r"Stable Diffusion XL checkpoints \(unet, vae, text_encoder, text_encoder_2\).*; this pipeline has "
    )
    sd3 = build_tiny_sd3_pipeline(seed=0)
    with pytest.raises(ValueError, match=supported + r".*use format='diffusers'"):
        export_merged(sd3, tmp_path / "sd3.safetensors", format="single_file")
    refiner_like = build_tiny_sdxl_pipeline(seed=0)
    refiner_like.text_encoder = None
    with pytest.raises(ValueError, match=supported + r"\['text_encoder_2', 'unet'\]: use"):
        export_merged(refiner_like, tmp_path / "xl.safetensors", format="single_file")
    assert list(tmp_path.iterdir()) == []


def test_sdxl_base_shapes_are_detected_and_invert_diffusers_converters():
    """SDXL-base-shaped UNet, VAE and both CLIPs (meta tensors): the file is detected as ``xl_base`` and
    diffusers' own single-file converters give back every tensor of every component."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
        clip_g = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
                hidden_act="gelu",
            )
        )
    states = {
        "unet": unet.state_dict(),
        "vae": vae.state_dict(),
        "l": clip_l.state_dict(),
        "g": clip_g.state_dict(),
    }
    ckpt = to_sdxl_original_layout(
        states["unet"], states["vae"], states["l"], states["g"], unet.config, vae.config
    )
    assert infer_diffusers_model_type(ckpt) == "xl_base"
    for key, shape in {  # well-known SDXL base 1.0 keys
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        CLIP_L_PREFIX + "encoder.layers.11.mlp.fc2.weight": (768, 3072),
        CLIP_G_PREFIX + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        CLIP_G_PREFIX + "transformer.resblocks.31.attn.in_proj_bias": (3840,),
        CLIP_G_PREFIX + "text_projection": (1280, 1280),
        CLIP_G_PREFIX + "positional_embedding": (77, 1280),
        CLIP_G_PREFIX + "token_embedding.weight": (49408, 1280),
        CLIP_G_PREFIX + "ln_final.weight": (1280,),
    }.items():
        assert tuple(ckpt[key].shape) == shape, key
    assert (
        "model.diffusion_model.input_blocks.1.1.norm.weight" not in ckpt
    )  # SDXL's first level: no attention

    back = convert_ldm_unet_checkpoint(ckpt, unet.config)
    assert back.keys() == states["unet"].keys()
    assert all(back[k] is states["unet"][k] for k in back)
    back = convert_ldm_vae_checkpoint(ckpt, vae.config)
    assert back.keys() == states["vae"].keys()
    assert all(back[k].shape == states["vae"][k].shape for k in back)
    back = {k.removeprefix("text_model."): t for k, t in convert_ldm_clip_checkpoint(ckpt).items()}
    assert back.keys() == {k.removeprefix("text_model.") for k in states["l"]}
    back = convert_open_clip_checkpoint(clip_g, ckpt, prefix=CLIP_G_PREFIX)
    assert back.keys() == states["g"].keys()
    assert all(back[k].shape == states["g"][k].shape for k in back)


def test_a_key_without_an_original_place_is_a_clear_refusal():
    pipe = build_tiny_sdxl_pipeline(seed=0)
    states = [merged_state_dict(getattr(pipe, c)) for c in COMPONENTS]
    configs = (pipe.unet.config, pipe.vae.config)
    states[3]["text_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"text_encoder_2 key .*self_attn\.extra\.weight.*Stable Diffusion XL"
    ):
        to_sdxl_original_layout(*states, *configs)
    del states[3]["text_model.encoder.layers.0.self_attn.extra.weight"]
    del states[3]["text_model.encoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"in_proj_bias needs q, k and v.*k_proj"):
        to_sdxl_original_layout(*states, *configs)
