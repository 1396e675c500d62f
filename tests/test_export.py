"""Merged export: stock diffusers folder and original-layout single file, on the tiny pipeline.

Tolerance: images from an export equal those of the adapter pipeline within 1e-4 (max abs, pixels in
[0, 1]); measured about 1e-6 in float32 for both formats, text-encoder adapter included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import sample_images
from safetensors import safe_open

from boft_diffusion import BOFTConfig, add_boft_to_pipeline, merge_boft, set_boft_adapters
from boft_diffusion.export import (
    PROVENANCE_NAME,
    SINGLE_FILE_NAME,
    export_merged,
    merged_state_dict,
    to_original_layout,
)
from boft_diffusion.inject import boft_layers
from boft_diffusion.tiny import build_tiny_pipeline, save_tiny_pipeline

IMAGE_TOLERANCE = 1e-4
UNET = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False, bias="boft_only")
TEXT = BOFTConfig(boft_block_size=4, init_weights=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny")


def adapted_pipe(seed: int = 0, name: str = "toy"):
    """The learned tiny pipeline with random (trained-looking) UNet and text-encoder adapters and trained biases."""
    pipe = build_tiny_pipeline(seed=0)
    torch.manual_seed(seed)
    add_boft_to_pipeline(pipe, {"unet": UNET, "text_encoder": TEXT}, name)
    with torch.no_grad():
        for layer in boft_layers(pipe.unet).values():
            if name in layer.boft_bias:  # to_out.0 has a bias; to_q/k/v do not
                layer.boft_bias[name].add_(0.05 * torch.randn_like(layer.boft_bias[name]))
    return pipe


def full_state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def exports(base_dir, tmp_path_factory):
    """One adapter pipeline, its reference images, and both exports (made once for the module)."""
    root = tmp_path_factory.mktemp("exports")
    pipe = adapted_pipe()
    before = {c: full_state(getattr(pipe, c)) for c in ("unet", "text_encoder", "vae")}
    reference = sample_images(pipe)
    export_merged(pipe, root / "diffusers")
    export_merged(pipe, root / "merged.safetensors", format="single_file")
    return {"pipe": pipe, "before": before, "reference": reference, "root": root}


STOCK_LOADER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    folder, single, config, out = sys.argv[1:]

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipe("a photo of sks toy", num_inference_steps=3, generator=generator, output_type="np",
                    height=32, width=32).images

    a = images(StableDiffusionPipeline.from_pretrained(folder))
    b = images(StableDiffusionPipeline.from_single_file(single, config=config, local_files_only=True))
    assert not [m for m in sys.modules if m.startswith("boft_diffusion")], "project code was imported"
    np.save(out, np.stack([a, b]))
    """
)


@pytest.mark.slow
def test_both_formats_open_in_stock_diffusers_and_match_adapter_images(exports, base_dir, tmp_path):
    root, out = exports["root"], tmp_path / "images.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOADER,
            str(root / "diffusers"),
            str(root / "merged.safetensors"),
            str(base_dir),
            str(out),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    from_folder, from_single = np.load(out)
    reference = exports["reference"]
    base = sample_images(build_tiny_pipeline(seed=0))
    assert np.abs(reference - base).max() > 0.01  # the adapter changes the images
    assert np.abs(from_folder - reference).max() < IMAGE_TOLERANCE
    assert np.abs(from_single - reference).max() < IMAGE_TOLERANCE


def test_export_leaves_the_pipeline_untouched(exports):
    pipe = exports["pipe"]
    for comp, before in exports["before"].items():
        after = getattr(pipe, comp).state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), comp
    layers = boft_layers(pipe.unet)
    assert layers and not any(layer.merged for layer in layers.values())
    assert np.abs(sample_images(pipe) - exports["reference"]).max() == 0


def test_text_encoder_adapter_is_in_both_exports(exports, base_dir):
    from diffusers import StableDiffusionPipeline

    pipe, root = exports["pipe"], exports["root"]
    merged = merged_state_dict(pipe.text_encoder)
    stock = StableDiffusionPipeline.from_pretrained(root / "diffusers").text_encoder.state_dict()
    key = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], exports["before"]["text_encoder"][f"{key[:-7]}.base_layer.weight"])
    torch.testing.assert_close(stock[key], merged[key], rtol=0, atol=0)
    with safe_open(root / "merged.safetensors", framework="pt") as f:
        single = f.get_tensor(f"cond_stage_model.transformer.text_model.{key}")
    torch.testing.assert_close(single, merged[key], rtol=0, atol=0)


def test_merged_state_dict_has_the_stock_layout(exports):
    pipe = exports["pipe"]
    stock = build_tiny_pipeline(seed=0, weights="random")
    for comp in ("unet", "text_encoder", "vae"):
        merged = merged_state_dict(getattr(pipe, comp))
        expected = getattr(stock, comp).state_dict()
        assert merged.keys() == expected.keys(), comp
        assert all(merged[k].shape == expected[k].shape for k in expected)
    # trained biases of adapted layers are carried over
    name = next(n for n, layer in boft_layers(pipe.unet).items() if "toy" in layer.boft_bias)
    bias = boft_layers(pipe.unet)[name].boft_bias["toy"]
    assert torch.equal(merged_state_dict(pipe.unet)[f"{name}.bias"], bias)


def test_configs_are_exported_at_their_live_values(tmp_path):
    """A config key changed after construction (register_to_config) is exported as changed, not reset to
    its default: the learned tiny VAE's measured scaling_factor once came back as SD's 0.18215."""
    pipe = build_tiny_pipeline(seed=0, weights="random")
    pipe.vae.register_to_config(shift_factor=0.25)
    assert "shift_factor" in pipe.vae.config["_use_default_values"]  # the case diffusers' from_config resets
    export_merged(pipe, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "vae" / "config.json").read_text())
    assert saved["shift_factor"] == 0.25
    world = build_tiny_pipeline(seed=0)
    assert world.vae.config.scaling_factor != 0.18215
    export_merged(world, tmp_path / "world")
    saved = json.loads((tmp_path / "world" / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == world.vae.config.scaling_factor


def test_provenance_in_metadata_and_json(exports, base_dir):
    root = exports["root"]
    prov = json.loads((root / "diffusers" / PROVENANCE_NAME).read_text())
    assert prov["format"] == "diffusers"
    assert prov["adapters"] == [{"name": "toy", "strength": 1.0, "components": ["unet", "text_encoder"]}]
    for path in (
        root / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors",
        root / "merged.safetensors",
    ):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        assert meta["boft_diffusion.adapters"] == "toy:1"
        assert json.loads(meta["boft_diffusion.provenance"])["adapters"][0]["name"] == "toy"


def test_single_file_round_trips_through_diffusers(exports, base_dir):
    from diffusers import StableDiffusionPipeline

    pipe = exports["pipe"]
    loaded = StableDiffusionPipeline.from_single_file(
        str(exports["root"] / "merged.safetensors"), config=str(base_dir), local_files_only=True
    )
    for comp in ("unet", "vae", "text_encoder"):
        merged = merged_state_dict(getattr(pipe, comp))
        state = getattr(loaded, comp).state_dict()
        assert merged.keys() <= state.keys(), comp
        assert all(torch.equal(state[k], merged[k]) for k in merged), comp


def test_strengths_and_already_merged_pipelines_export_what_they_sample(base_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = adapted_pipe(seed=1)
    set_boft_adapters(pipe, ["toy"], [0.5])
    merge_boft(pipe)  # exporting a merged pipeline must not merge twice
    reference = sample_images(pipe)
    export_merged(pipe, tmp_path / "half")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "half")
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(sample_images(loaded) - reference).max() < IMAGE_TOLERANCE
    assert json.loads((tmp_path / "half" / PROVENANCE_NAME).read_text())["adapters"][0]["strength"] == 0.5


@pytest.mark.parametrize("dtype, variant", [("fp16", "fp16"), ("bf16", None)])
def test_reduced_precision_exports(exports, tmp_path, dtype, variant):
    from diffusers import StableDiffusionPipeline

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    pipe = exports["pipe"]
    export_merged(pipe, tmp_path / "out", dtype=dtype, variant=variant)
    suffix = f".{variant}" if variant else ""
    assert (tmp_path / "out" / "unet" / f"diffusion_pytorch_model{suffix}.safetensors").is_file()
    loaded = StableDiffusionPipeline.from_pretrained(
        tmp_path / "out", variant=variant, torch_dtype=torch_dtype
    )
    merged = merged_state_dict(pipe.unet)
    for key, tensor in loaded.unet.state_dict().items():
        assert tensor.dtype == torch_dtype
        assert torch.equal(tensor, merged[key].to(torch_dtype)), key
    export_merged(pipe, tmp_path / "single.safetensors", format="single_file", dtype=dtype)
    with safe_open(tmp_path / "single.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16" if dtype == "fp16" else "BF16"}  # noqa: SIM118


def test_single_file_into_a_folder(exports, tmp_path):
    export_merged(exports["pipe"], tmp_path / "ckpt", format="single-file")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [PROVENANCE_NAME, SINGLE_FILE_NAME]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_exports_leave_no_temporaries_and_get_ordinary_permissions(exports):
    root = exports["root"]
    assert sorted(p.name for p in root.iterdir()) == ["diffusers", "merged.safetensors"]
    assert not list(root.rglob(".*"))  # no staging folder, no temporary metadata rewrite
    mask = os.umask(0o022)
    os.umask(mask)
    # The staged folder and the single file, not tempfile's private 0o700 / 0o600.
    assert (root / "diffusers").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (root / "merged.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_existing_output_is_refused(exports, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        export_merged(exports["pipe"], tmp_path / "taken")
    (tmp_path / "taken.safetensors").write_text("mine")
    with pytest.raises(FileExistsError):
        export_merged(exports["pipe"], tmp_path / "taken.safetensors", format="single_file")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "taken.safetensors").read_text() == "mine"


@pytest.mark.parametrize(
    "fmt, name", [("diffusers", "new/deeper/out"), ("single_file", "new/deeper/x.safetensors")]
)
def test_failure_leaves_nothing_behind(exports, tmp_path, monkeypatch, fmt, name):
    from boft_diffusion.export import write

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(write, "_add_safetensors_metadata", fail)
    monkeypatch.setattr(write, "safetensors_metadata", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_merged(exports["pipe"], tmp_path / name, format=fmt)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder, no created parents


def test_bad_arguments(exports, tmp_path):
    with pytest.raises(ValueError, match="Unknown export format"):
        export_merged(exports["pipe"], tmp_path / "x", format="ckpt")
    with pytest.raises(ValueError, match="Unknown dtype"):
        export_merged(exports["pipe"], tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


def test_original_layout_matches_sd15_keys_and_inverts_diffusers_converters():
    """SD-1.5-shaped UNet and VAE (meta tensors): diffusers' own single-file converters invert our mapping."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    with init_empty_weights():
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
    unet_state, vae_state = unet.state_dict(), vae.state_dict()
    ckpt = to_original_layout(unet_state, vae_state, {}, unet.config, vae.config)
    assert infer_diffusers_model_type(ckpt) == "v1"
    for key in (  # well-known SD 1.5 checkpoint keys
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_out.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.mid.block_2.norm1.weight",
    ):
        assert key in ckpt, key
    assert ckpt["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    back = convert_ldm_unet_checkpoint(ckpt, unet.config)
    assert back.keys() == unet_state.keys()
    assert all(back[k] is unet_state[k] for k in back)
    back = convert_ldm_vae_checkpoint(ckpt, vae.config)
    assert back.keys() == vae_state.keys()
    assert all(back[k].shape == vae_state[k].shape for k in back)


def test_modules_to_save_export_their_active_copy():
    from boft_diffusion import disable_boft

    pipe = build_tiny_pipeline(seed=0, weights="random")
    config = BOFTConfig(boft_block_size=4, init_weights=False, modules_to_save=["conv_out"])
    add_boft_to_pipeline(pipe, {"unet": config})
    with torch.no_grad():
        pipe.unet.conv_out.copies["default"].weight.add_(1.0)
    merged = merged_state_dict(pipe.unet)
    assert merged.keys() == build_tiny_pipeline(seed=0, weights="random").unet.state_dict().keys()
    assert torch.equal(merged["conv_out.weight"], pipe.unet.conv_out.copies["default"].weight)
    disable_boft(pipe)  # disabled adapters export the base model
    merged = merged_state_dict(pipe.unet)
    assert torch.equal(merged["conv_out.weight"], pipe.unet.conv_out.original.weight)
    name, layer = next(iter(boft_layers(pipe.unet).items()))
    assert torch.equal(merged[f"{name}.weight"], layer.base_layer.weight)


def test_a_unet_key_without_an_original_place_is_a_clear_refusal(tiny_pipe):
    unet_state = dict(tiny_pipe.unet.state_dict())
    unet_state["add_embedding.linear_1.weight"] = torch.zeros(1)  # an SDXL-only module
    with pytest.raises(ValueError, match="add_embedding.linear_1.weight.*original Stable Diffusion layout"):
        to_original_layout(
            unet_state, tiny_pipe.vae.state_dict(), {}, tiny_pipe.unet.config, tiny_pipe.vae.config
        )
