"""The controllable-generation recipe: light encoder and stock ControlNet, on the embedded tiny world.

Runs train a few steps on a few dozen world scenes, save, reload into a fresh stock pipeline with
identical conditioned samples, merge, and report control fidelity; bad input fails before anything
is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Stop, recipe_config, stop_at
from PIL import Image

from boft_diffusion.control import (
    LightControl,
    LightControlConfig,
    add_light_control,
    light_control,
    load_light_control,
    remove_light_control,
    sample_with_control,
)
from boft_diffusion.io import load_boft_weights
from boft_diffusion.metrics import world_control_cases
from boft_diffusion.pipeline import merge_boft
from boft_diffusion.recipes.controlnet import ControlNetConfig, ControlNetRecipe
from boft_diffusion.tiny import build_tiny_pipeline
from boft_diffusion.training.args import ConfigError, load_config

QUICK = [
    "train.max_train_steps=3",
    "data.num_generated_examples=16",
    "metrics.num_cases=2",
    "metrics.num_inference_steps=4",
    "validation.validation_steps=0",
    "validation.num_cases=1",
    "validation.num_images_per_prompt=1",
    "validation.num_inference_steps=3",
    "train.checkpointing_steps=0",
    "train.report_to=none",
]


def _config(out: Path, *overrides: str) -> ControlNetConfig:
    return recipe_config(ControlNetConfig, out, *QUICK, *overrides)


def _samples(pipe, seeds=(0, 1)) -> torch.Tensor:
    cases = world_control_cases(2)
    images = sample_with_control(
        pipe, [c.prompt for c in cases], [c.condition for c in cases], list(seeds), num_inference_steps=4
    )
    return torch.stack([torch.from_numpy(np.array(im)).float() for im in images])


@pytest.fixture(scope="module")
def light_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("light") / "run"
    recipe = ControlNetRecipe(_config(out, "control.mode=light", "train.export_merged=true"))
    recipe.run_all()
    for module in recipe.components.values():
        module.eval()
    return recipe, out


@pytest.fixture(scope="module")
def controlnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("controlnet") / "run"
    recipe = ControlNetRecipe(_config(out, "control.mode=controlnet", "train.export_merged=true"))
    recipe.run_all()
    for module in recipe.components.values():
        module.eval()
    return recipe, out


# --- the light control hook ---------------------------------------------------------------------------
def test_an_untrained_light_encoder_leaves_the_unet_exactly_as_it_was():
    pipe = build_tiny_pipeline(weights="random")
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    hidden = torch.randn(2, 77, 32)
    before = pipe.unet(latents, t, hidden).sample
    control = add_light_control(pipe, block_out_channels=(8, 16, 32))
    with control.conditioned(torch.rand(2, 3, 64, 64)):
        during = pipe.unet(latents, t, hidden).sample
    assert torch.equal(before, during)  # zero-initialised output convolution
    with torch.no_grad():
        control.encoder.conv_out.weight.normal_()
    with control.conditioned(torch.rand(2, 3, 64, 64)):
        assert not torch.allclose(pipe.unet(latents, t, hidden).sample, before)
    assert torch.equal(pipe.unet(latents, t, hidden).sample, before)  # outside the block: no control
    remove_light_control(pipe)
    assert light_control(pipe) is None and not pipe.unet.conv_in._forward_hooks
    assert "control_encoder" not in dict(pipe.unet.named_modules())


def test_the_light_hook_repeats_features_over_a_guidance_doubled_batch_and_checks_sizes():
    pipe = build_tiny_pipeline(weights="random")
    control = add_light_control(pipe, block_out_channels=(8, 16, 32))
    with torch.no_grad():
        control.encoder.conv_out.weight.normal_()
    hidden = torch.randn(2, 77, 32)
    latents = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1)
    same = hidden[:1].repeat(2, 1, 1)
    with control.conditioned(torch.rand(1, 3, 64, 64)):  # one control image for a doubled batch
        out = pipe.unet(latents, torch.tensor([5, 5]), same).sample
    assert torch.allclose(out[0], out[1], atol=1e-5)
    with control.conditioned(torch.rand(1, 3, 32, 32)), pytest.raises(ValueError, match="4x the latent size"):
        pipe.unet(latents, torch.tensor([5, 5]), hidden)
    with pytest.raises(ValueError, match="another model"):
        LightControl(LightControlConfig(64, 3, (8, 16, 32))).attach(pipe.unet)


# --- light mode ------------------------------------------------------------------------------------------
def test_light_mode_trains_saves_and_measures_control_fidelity(light_run):
    recipe, out = light_run
    for name in (
        "boft_weights.safetensors",
        "metrics.json",
        "metrics.png",
        "README.md",
        "validation/final.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "control_data" / "metadata.jsonl").is_file()
    report = json.loads((out / "metrics.json").read_text())
    for stage in ("before", "after"):
        assert 0.0 <= report[stage]["control_edge_f1"] <= 1.0
        assert 0.0 <= report[stage]["control_mask_iou"] <= 1.0
    assert report["scorer"] == "world" and len(report["cases"]) == 2
    assert "control_edge_f1" in (out / "README.md").read_text()
    keys = set(recipe.adapter_tensors())
    assert any(k.startswith("control_encoder.encoder.") for k in keys)
    assert any(k.startswith("unet.") and k.endswith("boft_R") for k in keys)


def test_a_light_adapter_reloads_into_a_fresh_stock_pipeline_with_identical_conditioned_samples(light_run):
    recipe, out = light_run
    trained = _samples(recipe.pipe)
    fresh = build_tiny_pipeline()
    load_boft_weights(fresh, out)
    assert isinstance(light_control(fresh), LightControl)
    assert torch.equal(_samples(fresh), trained)
    merge_boft(fresh)  # the rotations fold into the UNet; the encoder stays a hook
    assert (_samples(fresh) - trained).abs().max() <= 2  # uint8 pixels: float rounding of the merge


def test_light_merged_export_is_a_stock_pipeline_and_the_encoder_alone_with_the_same_samples(light_run):
    from diffusers import StableDiffusionPipeline

    recipe, out = light_run
    pipe = StableDiffusionPipeline.from_pretrained(out / "merged" / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    control = load_light_control(pipe, out / "merged" / "control_encoder")
    assert light_control(pipe) is control and control.attached
    assert (_samples(pipe) - _samples(recipe.pipe)).abs().max() <= 2  # the merge's float rounding
    with pytest.raises(ValueError, match="already has a light control encoder"):
        load_light_control(pipe, out / "merged" / "control_encoder")


def test_a_bad_light_encoder_folder_is_refused_and_the_pipeline_left_as_it_was(light_run, tmp_path):
    _, out = light_run
    source = out / "merged" / "control_encoder"
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="is not a light control encoder folder"):
        load_light_control(pipe, tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(
        (source / "config.json").read_text().replace('"LightControl"', '"Other"')
    )
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="invalid light control encoder"):
        load_light_control(pipe, broken)
    (broken / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(ValueError, match="invalid light control encoder"):
        load_light_control(pipe, broken)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(
        (source / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    pipe.unet.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)  # a UNet of another width
    with pytest.raises(ValueError, match="made for another model"):
        load_light_control(pipe, broken)
    assert light_control(pipe) is None and not pipe.unet.conv_in._forward_hooks


# --- controlnet mode ----------------------------------------------------------------------------------------
def test_controlnet_mode_trains_its_embedding_zero_convs_and_attention(controlnet_run):
    recipe, out = controlnet_run
    keys = set(recipe.adapter_tensors())
    assert any(k.startswith("controlnet.controlnet_cond_embedding.") for k in keys)
    assert any(k.startswith("controlnet.controlnet_down_blocks.0.") for k in keys)
    assert any(k.startswith("controlnet.controlnet_mid_block.") for k in keys)
    assert any(k.startswith("controlnet.") and k.endswith("boft_R") for k in keys)
    assert not any(k.startswith("unet.") for k in keys)  # control.train_unet=false
    from safetensors import safe_open

    with safe_open(out / "boft_weights.safetensors", "pt") as handle:
        control = json.loads(handle.metadata()["control"])
    assert control["mode"] == "controlnet" and control["controlnet"] == "from_unet"
    assert control["controlnet_fingerprint"].startswith("sha256:")  # what loading checks the ControlNet by
    report = json.loads((out / "metrics.json").read_text())
    assert report["after"]["control_edge_f1"] is not None


def test_a_controlnet_adapter_reloads_rebuilding_its_controlnet_and_merges(controlnet_run):
    recipe, out = controlnet_run
    trained = _samples(recipe.pipe)
    fresh = build_tiny_pipeline()
    load_boft_weights(fresh, out)  # the ControlNet is rebuilt from the UNet, its fingerprint checked
    assert fresh.controlnet is not None
    assert torch.equal(_samples(fresh), trained)
    merge_boft(fresh)
    assert (_samples(fresh) - trained).abs().max() <= 2


@pytest.mark.slow
def test_the_merged_controlnet_opens_with_stock_diffusers_alone(controlnet_run, tmp_path):
    recipe, out = controlnet_run
    folder = out / "merged" / "controlnet"
    assert (folder / "config.json").is_file()
    base = tmp_path / "base"
    build_tiny_pipeline().save_pretrained(base)
    cond = tmp_path / "cond.png"
    world_control_cases(1)[0].condition.save(cond)
    code = f"""
import sys, torch, numpy
sys.modules["boft_diffusion"] = None  # stock diffusers only
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image
cn = ControlNetModel.from_pretrained({str(folder)!r})
pipe = StableDiffusionControlNetPipeline.from_pretrained({str(base)!r}, controlnet=cn, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
image = pipe("{world_control_cases(1)[0].prompt}", image=Image.open({str(cond)!r}), num_inference_steps=4,
             guidance_scale=4.0, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
numpy.save({str(tmp_path / "stock.npy")!r}, numpy.asarray(image))
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    stock = torch.from_numpy(np.load(tmp_path / "stock.npy")).float()
    case = world_control_cases(1)[0]
    ours = sample_with_control(recipe.pipe, [case.prompt], [case.condition], [0], num_inference_steps=4)[0]
    ours = torch.from_numpy(np.array(ours)).float()
    assert (stock - ours).abs().max() <= 2


# --- bad input -------------------------------------------------------------------------------------------------
def test_a_data_folder_without_metadata_is_an_error_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "run"
    with pytest.raises(Exception, match="metadata.jsonl"):
        ControlNetRecipe(_config(out, f"data.train_data_dir={data}")).run_all()
    assert not out.exists()


def test_a_controlnet_that_does_not_fit_the_unet_is_refused_before_anything_is_written(tmp_path):
    from diffusers import ControlNetModel

    other = ControlNetModel(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=16, layers_per_block=1, norm_num_groups=8, conditioning_embedding_out_channels=(8, 16, 32),
    )  # fmt: skip
    other.save_pretrained(tmp_path / "cn")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="does not fit the UNet"):
        ControlNetRecipe(
            _config(
                out, "control.mode=controlnet", f"control.controlnet_model_name_or_path={tmp_path / 'cn'}"
            )
        ).run_all()
    assert not out.exists()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="control.mode"):
        _config(tmp_path / "r", "control.mode=lite")
    with pytest.raises(ConfigError):
        _config(tmp_path / "r", "control.no_such_key=1")
    with pytest.raises(ConfigError, match="pair up"):
        _config(tmp_path / "r", "metrics.prompts=[a photo of a toy]")


def test_sampling_with_a_control_image_needs_a_control_adapter(tmp_path):
    pipe = build_tiny_pipeline(weights="random")
    with pytest.raises(ValueError, match="no control"):
        sample_with_control(pipe, ["a toy"], [Image.new("RGB", (64, 64))], [0], num_inference_steps=2)


@pytest.mark.slow
def test_cli_trains_and_samples_under_control(tmp_path):
    out, base = tmp_path / "run", tmp_path / "base"
    cli = [sys.executable, "-m", "boft_diffusion.cli"]
    train = [*cli, "train", "controlnet", "control.mode=light", f"train.output_dir={out}", *QUICK]
    done = subprocess.run(train, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "control_edge_f1" in done.stdout and (out / "boft_weights.safetensors").is_file()
    build_tiny_pipeline().save_pretrained(base)
    cond = tmp_path / "cond.png"
    world_control_cases(1)[0].condition.save(cond)
    grid = tmp_path / "grid.png"
    done = subprocess.run(
        [*cli, "sample", "--base", str(base), "--adapter", str(out), "--control", str(cond), "--prompt",
         "a photo of a red star", "--num-images", "2", "--steps", "3", "--out", str(grid)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Image.open(grid).size == (64 * 2, 64)
    bad = subprocess.run(
        [*cli, "sample", "--base", str(base), "--control", str(cond), "--prompt", "a toy", "--steps", "2",
         "--out", str(tmp_path / "g2.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "no adapter given brings a control" in bad.stderr
    assert not (tmp_path / "g2.png").exists()


# --- configs ------------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "controlnet").glob("*.yaml"))


def test_the_expected_controlnet_configs_exist():
    assert {p.name for p in CONFIGS} >= {
        "tiny_light.yaml",
        "sd15_canny_light.yaml",
        "sd15_canny_controlnet.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_controlnet_config_starts_with_its_command_and_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# boft-diffusion train controlnet --config configs/controlnet/{path.name}")
    assert isinstance(load_config(ControlNetConfig, path), ControlNetConfig)


def test_tiny_controlnet_yaml_is_the_default():
    assert (
        load_config(ControlNetConfig, REPO / "configs/controlnet/tiny_controlnet.yaml") == ControlNetConfig()
    )


@pytest.mark.parametrize("name", ["sd15_canny_light.yaml", "sd15_canny_controlnet.yaml"])
def test_sd15_controlnet_configs_fit_sd15_widths(name):
    config = load_config(ControlNetConfig, REPO / "configs/controlnet" / name)
    assert config.data.resolution == 512 and config.metrics.detector == "edges"
    assert config.control.widths(8) == (16, 32, 96, 256)
    boft = config.boft.to_config(config.boft.unet_target_modules)
    for dim in (320, 640, 1280, 768):  # attention widths and the CLIP text width (cross-attention k / v)
        assert boft.resolve_blocks(dim).block_num == 8


def test_every_controlnet_key_is_documented():
    from boft_diffusion.training.args import config_keys, field_docs

    docs = field_docs(ControlNetConfig)
    assert list(docs) == config_keys(ControlNetConfig)
    assert not [key for key, (doc, _) in docs.items() if not doc]


# --- resume -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["light", "controlnet"])
def test_a_stopped_and_resumed_control_run_ends_with_the_same_adapter(tmp_path, mode):
    from boft_diffusion.recipes.controlnet import run
    from boft_diffusion.training.checkpoint import latest_checkpoint

    steps = ["train.max_train_steps=4", "train.checkpointing_steps=2", "data.random_flip=true",
             "metrics.detector=none", f"control.mode={mode}"]  # fmt: skip
    whole = run(_config(tmp_path / "whole", *steps))
    with pytest.raises(Stop):
        run(_config(tmp_path / "parts", *steps), on_step=stop_at(3))
    assert latest_checkpoint(tmp_path / "parts").name == "checkpoint-2"
    resumed = run(_config(tmp_path / "parts", *steps, "train.resume_from_checkpoint=latest"))
    assert resumed.global_step == 4 and resumed.losses == pytest.approx(whole.losses[2:], rel=1e-5)
    assert set(resumed.adapter) == set(whole.adapter)
    for key, value in whole.adapter.items():
        torch.testing.assert_close(resumed.adapter[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_eval_refuses_a_control_adapter_with_a_pointer_to_its_metrics(light_run, tmp_path):
    _, out = light_run
    done = subprocess.run(
        [sys.executable, "-m", "boft_diffusion.cli", "eval", str(out), "--grid", str(tmp_path / "g.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "controllable-generation adapter" in done.stderr
    assert not (tmp_path / "g.png").exists()


@pytest.mark.slow
def test_each_mode_trains_and_measures_under_bf16_with_gradient_checkpointing(tmp_path):
    """Float32 trained parts next to a bf16 base: the ControlNet's residuals are cast to the UNet's dtype
    (they were added as float32 ahead of the UNet's bf16 norms), the light encoder's features to conv_in's.
    accelerate keeps one mixed precision per process: both bf16 runs share one process of their own, through
    the CLI's entry point. (fp16 needs a GPU: on a CPU it is refused before training, as
    tests/test_run_safety.py checks.)"""
    from safetensors.torch import load_file

    runs = {mode: tmp_path / mode for mode in ("controlnet", "light")}
    calls = [
        ["train", "controlnet", f"control.mode={mode}", f"train.output_dir={out}", *QUICK,
         "train.mixed_precision=bf16", "train.gradient_checkpointing=true"]
        for mode, out in runs.items()
    ]  # fmt: skip
    script = f"import sys; from boft_diffusion import cli; sys.exit(max(cli.main(a) for a in {calls!r}))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for out in runs.values():
        assert all(t.dtype == torch.float32 for t in load_file(out / "boft_weights.safetensors").values())
        assert json.loads((out / "metrics.json").read_text())["after"]["control_edge_f1"] is not None


def test_inspect_says_what_control_an_adapter_has(light_run, controlnet_run):
    from boft_diffusion.commands.inspect import format_report, inspect_adapter

    light = inspect_adapter(light_run[1])
    assert light["control"]["mode"] == "light" and light["control"]["downsample"] == 4
    assert "Control: light encoder" in format_report(light) and "--control IMAGE" in format_report(light)
    net = inspect_adapter(controlnet_run[1])
    assert net["control"]["controlnet"] == "from_unet"
    assert "ControlNetModel initialised from the UNet" in format_report(net)


@pytest.mark.parametrize(
    "metadata",
    [{"control": "not json"}, {"control": '{"mode": "sketch"}'}, {"control": '{"mode": "light"}'},
     {"control": '{"mode": "light"}', "light_control": '{"embedding_channels": 0}'}],
)  # fmt: skip
def test_inspect_refuses_malformed_control_metadata(metadata):
    from boft_diffusion.commands.inspect import control_info
    from boft_diffusion.io import AdapterFormatError

    assert control_info({}, "a.safetensors") is None
    with pytest.raises(AdapterFormatError, match="a.safetensors: invalid control metadata"):
        control_info(metadata, "a.safetensors")


def test_the_comparison_script_trains_a_peft_lora_row_at_a_matched_budget(tmp_path):
    """scripts/compare_control.py's LoRA row: the same recipe with PEFT LoRA on the ControlNet projections,
    at the rank whose factors come closest to the budget; its factors and the full parts train."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_control", REPO / "scripts" / "compare_control.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    row = script.train_one(
        script.LORA, [*QUICK, "train.max_train_steps=2"], tmp_path / "lora", lora_budget=9_664
    )
    assert row["method"] == "LoRA (PEFT) r=4" and row["adapter_parameters"] == 9_728  # 4 * sum(in + out)
    assert row["after"]["control_edge_f1"] is not None
    boft = script.train_one(
        "BOFT", [*QUICK, "train.max_train_steps=2", "boft.block_size=8", "boft.block_num=0"], tmp_path / "b"
    )
    assert (
        boft["adapter_parameters"] == 9_664
    )  # the budget above: full parts (frozen originals aside) excluded
