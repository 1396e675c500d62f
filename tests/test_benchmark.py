"""Benchmark smoke test on the tiny preset: every measurement is there and the table renders (no timing
assertions: speed is measured by the benchmark, never asserted in tests). The full-width SDXL and Flux
presets are checked on the meta device (shapes only) and run shrunk to tiny widths."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from boft_diffusion import benchmark


def test_worker_measures_every_figure_in_process():
    result = benchmark.measure(benchmark.METHODS["boft-b8-m2"], benchmark.PRESETS["tiny"])
    preset = benchmark.PRESETS["tiny"]
    assert result["trainable_params"] > 0
    assert len(result["step_s"]) == len(result["floor_step_s"]) == preset.timed_steps
    for key in ("forward_base_s", "forward_unmerged_s", "forward_merged_s"):
        assert len(result[key]) == preset.forward_repeats
    assert len(result["merge_s"]) == preset.merge_repeats
    assert result["peak_memory_bytes"] > 0


def test_floor_has_no_trainable_parameters_and_no_merge():
    result = benchmark.measure(benchmark.METHODS["floor"], benchmark.PRESETS["tiny"])
    assert result["trainable_params"] == 0 and result["merge_s"] == []


def test_command_line_runs_workers_and_writes_json(tmp_path, capsys):
    methods = ["floor", "boft-b8-m1"] + (["lora"] if benchmark.METHODS["lora"].available() else [])
    out = tmp_path / "bench.json"
    assert benchmark.main(["--preset", "tiny", "--methods", *methods, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]) == set(methods)
    assert report["preset"]["name"] == "tiny" and report["rounds"] == 1
    for method in methods:
        assert len(report["runs"][method]) == 1
        assert report["summary"][method]["step_s"] > 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "BOFT b=8, m=1" in printed
    assert "targets" not in report  # figures only: thresholds live in issues, not in the product


def test_table_from_a_summary():
    fake = {
        key: {
            "label": benchmark.METHODS[key].label,
            "trainable_params": 10,
            "step_s": step,
            "step_vs_floor": step / 2.0,
            "peak_memory_gb": 4.0,
            "forward_base_s": 1.0,
            "forward_unmerged_s": 1.05,
            "forward_merged_s": 1.0,
            "unmerged_vs_base": 1.05,
            "merged_vs_base": 1.0,
            "merge_s": None if key == "floor" else 0.3,
        }
        for key, step in [
            ("floor", 2.0),
            ("lora", 2.1),
            ("peft-boft", 9.0),
            ("boft-b8-m1", 2.1),
            ("boft-b8-m2", 2.3),
        ]
    }
    table = benchmark.format_table(fake)
    assert table.count("\n") == len(fake) + 1
    boft_row = next(line for line in table.splitlines() if line.startswith("| BOFT b=8, m=2 |"))
    assert "| 1.15 |" in boft_row  # 2.3 s / 2.0 s floor


def test_presets_share_the_tiny_pipeline_shape_and_default_targets():
    from boft_diffusion.inject import UNET_ATTENTION_TARGETS, boft_layers
    from boft_diffusion.tiny import build_tiny_pipeline

    unet = benchmark.build_model(benchmark.PRESETS["tiny"], torch.device("cpu"))
    tiny = build_tiny_pipeline(seed=0).unet
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == {
        k: tuple(v.shape) for k, v in tiny.state_dict().items()
    }
    benchmark.Adapter(benchmark.METHODS["boft-b8-m1"], unet, UNET_ATTENTION_TARGETS)
    adapted = boft_layers(unet)
    assert adapted and all(name.endswith(tuple(UNET_ATTENTION_TARGETS)) for name in adapted)


def test_presets_are_listed():
    assert {"tiny", "sd15", "sdxl", "flux"} <= set(benchmark.PRESETS)
    for name in benchmark.PRESETS:
        preset = benchmark.PRESETS[name]
        assert preset.name == name and preset.family in benchmark.FAMILIES


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sdxl_preset_is_sdxl_shaped_at_full_width():
    preset = benchmark.PRESETS["sdxl"]
    unet = benchmark.build_model(preset, torch.device("meta"))  # shapes only, no memory
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert unet.conv_in.out_channels == 320 and unet.mid_block.resnets[0].in_channels == 1280
    assert [b.resnets[0].out_channels for b in unet.down_blocks] == [320, 640, 1280]
    assert unet.add_embedding.linear_1.in_features == 2816 and unet.add_time_proj.num_channels == 256
    assert not hasattr(unet.down_blocks[0], "attentions")  # SDXL: no attention at the widest resolution
    transformer_blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(transformer_blocks) == 11  # 2 + 2 down, 1 mid, 3 + 3 up (SDXL: 70)
    cross = [b.attn2 for b in transformer_blocks]
    assert {(a.to_k.in_features, a.to_q.in_features) for a in cross} == {(2048, 640), (2048, 1280)}
    assert {a.heads * 64 for a in cross} == {640, 1280}  # 64-channel heads
    assert 600e6 < _params(unet) < 700e6
    inputs = benchmark.make_inputs(preset, torch.device("cpu"))
    assert inputs.sample.shape == inputs.target.shape == (1, 4, 32, 32)
    assert inputs.cond["encoder_hidden_states"].shape == (1, 77, 2048)
    assert inputs.cond["added_cond_kwargs"]["text_embeds"].shape == (1, 1280)
    assert inputs.cond["added_cond_kwargs"]["time_ids"].shape == (1, 6)


def test_flux_preset_is_flux_shaped_at_full_width():
    preset = benchmark.PRESETS["flux"]
    flux = benchmark.build_model(preset, torch.device("meta"))
    assert type(flux).__name__ == "FluxTransformer2DModel"
    assert (flux.x_embedder.in_features, flux.x_embedder.out_features) == (64, 3072)
    assert flux.context_embedder.in_features == 4096
    assert len(flux.transformer_blocks) == 1 and len(flux.single_transformer_blocks) == 1
    assert flux.time_text_embed.text_embedder.linear_1.in_features == 768
    assert hasattr(flux.time_text_embed, "guidance_embedder")
    assert tuple(flux.pos_embed.axes_dim) == (16, 56, 56)
    attn = flux.transformer_blocks[0].attn
    assert attn.heads == 24 and attn.to_q.weight.shape == attn.add_q_proj.weight.shape == (3072, 3072)
    assert 500e6 < _params(flux) < 600e6
    assert benchmark.present_targets(flux, benchmark.FAMILIES["flux"].targets) == [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"
    ]  # fmt: skip
    inputs = benchmark.make_inputs(preset, torch.device("cpu"))
    assert inputs.sample.shape == inputs.target.shape == (1, 256, 64)
    assert inputs.cond["encoder_hidden_states"].shape == (1, 64, 4096)
    assert inputs.cond["pooled_projections"].shape == (1, 768)
    assert inputs.cond["img_ids"].shape == (256, 3) and inputs.cond["txt_ids"].shape == (64, 3)
    assert inputs.cond["guidance"].shape == (1,)


def _shrunk(name: str) -> benchmark.Preset:
    """The preset with the tiny pipelines' widths, few tokens and one repeat of everything."""
    from boft_diffusion import tiny

    model = {"sdxl": tiny.TINY_SDXL_UNET_CONFIG, "flux": tiny.TINY_FLUX_TRANSFORMER_CONFIG}[name]
    text = {"vocab_size": 49408, **tiny.TINY_TEXT_CONFIG} if name == "sdxl" else None
    return dataclasses.replace(
        benchmark.PRESETS[name], model=model, text_encoder=text, latent_size=8, text_tokens=8,
        warmup_steps=1, timed_steps=1, forward_repeats=1, merge_repeats=1,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_shrunk_presets_run_through_the_input_hook_and_the_worker(name):
    preset = _shrunk(name)
    model = benchmark.build_model(preset, torch.device("cpu"))
    inputs = benchmark.make_inputs(preset, torch.device("cpu"))
    with torch.no_grad():
        out = inputs(model)
    assert out.shape == inputs.target.shape == inputs.sample.shape
    assert torch.isfinite(out).all()
    del model
    result = benchmark.measure(benchmark.METHODS["boft-b8-m1"], preset)
    assert result["trainable_params"] > 0 and len(result["step_s"]) == len(result["merge_s"]) == 1
