"""Benchmark smoke test on the tiny preset: every measurement is there and the table renders (no timing
assertions: speed is measured by the benchmark, never asserted in tests). The full-width SDXL and Flux
presets are checked on the meta device (shapes only) and run shrunk to tiny widths."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from boft_diffusion import benchmark, cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_worker_measures_every_figure_in_process():
    result = benchmark.measure(benchmark.METHODS["boft-b8-m2"], benchmark.PRESETS["tiny"])
    preset = benchmark.PRESETS["tiny"]
    assert result["trainable_params"] > 0
    assert len(result["step_s"]) == len(result["floor_step_s"]) == preset.timed_steps
    for key in ("forward_base_s", "forward_unmerged_s", "forward_merged_s"):
        assert len(result[key]) == preset.forward_repeats
    assert len(result["merge_s"]) == preset.merge_repeats
    assert result["peak_memory_bytes"] > 0
    assert result["input_shape"] == [1, 4, 16, 16] and result["latent_size"] == 16


@pytest.mark.slow
def test_floor_has_no_trainable_parameters_and_no_merge():
    result = benchmark.measure(benchmark.METHODS["floor"], benchmark.PRESETS["tiny"])
    assert result["trainable_params"] == 0 and result["merge_s"] == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["floor", "boft-b8-m1"])
def test_training_step_needs_no_input_gradient_and_the_floor_reaches_the_adapted_layers(method):
    """The latents never require grad (as in the recipes); in the floor step autograd still reaches
    every adapted layer (their outputs require grad) but nothing below the earliest one (its input)."""
    preset = dataclasses.replace(benchmark.PRESETS["tiny"], warmup_steps=0, timed_steps=1)
    model = benchmark.build_model(preset, torch.device("cpu"))
    targets = benchmark.present_targets(model, benchmark.MODEL_SHAPES["unet"].targets)
    adapter = benchmark.Adapter(benchmark.METHODS[method], model, targets)
    taps = benchmark.FloorTaps(model, targets)
    inputs = benchmark.make_inputs(preset, torch.device("cpu"))
    seen = {"sample": [], "inputs": [], "outputs": []}
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen["sample"].append(kwargs["sample"].requires_grad), with_kwargs=True
    )
    adapted = [
        m for name, m in model.named_modules() if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    ]

    def record(module, args, output):
        if taps.enabled:  # the floor steps
            seen["inputs"].append(args[0].requires_grad)
            seen["outputs"].append(output.requires_grad)

    for module in adapted:
        module.register_forward_hook(record)
    benchmark.time_training(model, adapter, taps, inputs, preset, benchmark.Clock(torch.device("cpu")))
    assert seen["sample"] and not any(seen["sample"])
    assert all(seen["outputs"])  # every adapted layer is on the backward path
    assert seen["inputs"][0] is False and any(seen["inputs"])  # nothing below the first one is
    if adapter.trains:
        assert all(p.grad is None for p in adapter.trainable_parameters())  # zero_grad(set_to_none=True)


@pytest.mark.slow
def test_command_line_runs_workers_and_writes_json(tmp_path, capsys, monkeypatch):
    methods = ["floor", "boft-b8-m1"]  # two workers (LoRA's ratios: the summary test below)
    # A method whose package is missing is listed with why, not run.
    monkeypatch.setattr(benchmark.presets, "find_spec", lambda name: None if name == "lycoris" else object())
    unavailable = ["lycoris-boft"]
    out = tmp_path / "bench.json"
    argv = [
        "--preset",
        "tiny",
        "--latent-size",
        "8",
        "--timed-steps",
        "2",
        "--forward-repeats",
        "2",
        "--methods",
        *methods,
        *unavailable,
    ]
    assert cli.main(["bench", *argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]) == set(methods)
    assert report["preset"]["name"] == "tiny" and report["rounds"] == 1
    assert report["latent_size"] == report["preset"]["latent_size"] == 8
    for method in methods:
        (run,) = report["runs"][method]
        assert run["input_shape"] == [1, 4, 8, 8] and len(run["step_s"]) == 2
        assert len(run["forward_unmerged_s"]) == 2
        summary = report["summary"][method]
        assert summary["step_s"] > 0
        for key in ("step_vs_floor", "unmerged_vs_base", "merged_vs_base"):
            ratio = summary[key]
            assert ratio["low"] <= ratio["median"] <= ratio["high"] and ratio["spread_over"] == "repeats"
    printed = capsys.readouterr().out
    assert "| method |" in printed and "BOFT b=8, m=1" in printed and "| ≤ 1.05 |" in printed
    assert "–" in printed.split("| BOFT b=8, m=1 |")[1].splitlines()[0]  # spreads in the table
    for key in unavailable:
        assert key in report["unavailable"] and f"not measured: {key}" in printed
    assert "targets" not in report  # figures only


def _fake_run(step: float, floor: float, memory: float, forward: float) -> dict:
    return {
        "trainable_params": 10,
        "latent_size": 16,
        "step_s": [step, step * 1.02],
        "floor_step_s": [floor, floor],
        "peak_memory_bytes": memory * 1e9,
        "forward_base_s": [1.0, 1.0],
        "forward_unmerged_s": [forward, forward],
        "forward_merged_s": [1.0, 1.0],
        "merge_s": [0.3],
    }


def test_summary_and_table_carry_the_spread_over_rounds():
    runs = {
        "floor": [_fake_run(2.0, 2.0, 4.0, 1.0), _fake_run(2.0, 2.0, 4.0, 1.0)],
        "lora": [_fake_run(2.1, 2.0, 4.0, 1.0), _fake_run(2.1, 2.0, 4.0, 1.0)],
        "boft-b8-m2": [_fake_run(2.3, 2.0, 4.0, 1.05), _fake_run(2.0, 2.0, 4.2, 1.05)],
    }
    summary = benchmark.summarize(runs)
    boft = summary["boft-b8-m2"]
    assert boft["step_vs_floor"]["spread_over"] == "rounds" and len(boft["step_vs_floor"]["per_round"]) == 2
    assert boft["step_vs_floor"]["low"] == pytest.approx(1.01) and boft["step_vs_floor"][
        "high"
    ] == pytest.approx(1.1615)
    assert boft["memory_vs_lora"]["low"] == pytest.approx(1.0) and boft["memory_vs_lora"][
        "high"
    ] == pytest.approx(1.05)
    assert benchmark.verdict(boft["step_vs_lora"], 1.05) == "unclear"  # 0.96 .. 1.10
    assert benchmark.verdict(summary["lora"]["step_vs_lora"], 1.05) == "yes"
    assert benchmark.verdict({"low": 1.06, "high": 1.2}, 1.05) == "no"
    table = benchmark.format_table(summary)
    assert table.count("\n") == len(summary) + 1
    boft_row = next(line for line in table.splitlines() if line.startswith("| BOFT b=8, m=2 |"))
    assert "| 1.09 (1.01–1.16) |" in boft_row and "| unclear |" in boft_row
    assert "| 1.05 (1.05–1.05) |" in boft_row  # unmerged forward × base


def test_profile_prints_its_categories(capsys):
    assert cli.main(["bench", "--preset", "tiny", "--profile"]) == 0
    printed = capsys.readouterr().out
    assert "Per-layer profile: one 32-wide projection on 256 tokens" in printed
    for category in (*benchmark.PROFILE_CATEGORIES, "total"):
        assert f"| {category} |" in printed
    assert "BOFT b=8, m=2 CPU ms" in printed
    assert benchmark.profile_category("aten::linalg_solve", []) == "Cayley (solve)"
    assert benchmark.profile_category("aten::bmm", ["boft::block_rotations"]) == "Cayley (solve)"
    assert benchmark.profile_category("aten::index_select", ["boft::apply_rotation"]) == "permutation"
    assert benchmark.profile_category("aten::bmm", ["boft::apply_rotation"]) == "block product"
    assert benchmark.profile_category("aten::copy_", []) == "layout copies"
    assert benchmark.profile_category("aten::addmm", []) == "base matmul"


@pytest.mark.slow
def test_a_failing_worker_keeps_the_other_methods(tmp_path, capsys, monkeypatch):
    command = benchmark.runner._worker_command

    def failing(method, *args):
        if method == "boft-b8-m1":
            return [sys.executable, "-c", "raise SystemExit('ValueError: no layout fits 320')"]
        return command(method, *args)

    monkeypatch.setattr(benchmark.runner, "_worker_command", failing)
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--latent-size", "8", "--timed-steps", "1", "--forward-repeats", "1"]
    assert (
        cli.main(["bench", *argv, "--rounds", "2", "--methods", "floor", "boft-b8-m1", "--json", str(out)])
        == 1
    )
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"floor"} and len(report["runs"]["floor"]) == 2
    assert report["failed"] == {"boft-b8-m1": "ValueError: no layout fits 320"}
    printed = capsys.readouterr().out
    assert printed.count("FAILED") == 1  # not run again in round 2
    assert "failed: boft-b8-m1 (BOFT b=8, m=1): ValueError: no layout fits 320" in printed


def test_methods_report_why_they_are_unavailable(monkeypatch):
    assert all(m.available() for m in benchmark.METHODS.values())  # every peer is a test extra
    monkeypatch.setattr(benchmark.presets, "find_spec", lambda name: None)
    assert "pip install lycoris-lora" in benchmark.METHODS["lycoris-boft"].unavailable_reason()
    assert "pip install peft" in benchmark.METHODS["peft-oft"].unavailable_reason()
    assert benchmark.METHODS["boft-b8-m2"].unavailable_reason() is None


def test_lycoris_boft_wraps_exactly_the_targets_and_switches_off_to_the_base():
    """LyCORIS (a test extra) on the adapted projections only, not its ``full`` preset; switching it
    on and off, merging and unmerging any number of times never wraps a module twice."""
    cpu = torch.device("cpu")
    preset = benchmark.PRESETS["tiny"]
    model = benchmark.build_model(preset, cpu)
    targets = benchmark.present_targets(model, benchmark.MODEL_SHAPES["unet"].targets)
    inputs = benchmark.make_inputs(preset, cpu)
    with torch.no_grad():
        base = inputs(model)
    adapter = benchmark.Adapter(benchmark.METHODS["lycoris-boft"], model, targets)
    adapted = [n for n, _ in model.named_modules() if n.endswith(tuple("." + t for t in targets))]
    assert len(adapter._lycoris.loras) == len(adapted) > 0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        on = inputs(model)
        adapter.enable(False)
        adapter.enable(False)
        assert torch.equal(inputs(model), base)
        adapter.enable(True)
        adapter.enable(True)
        assert torch.equal(inputs(model), on) and not torch.allclose(on, base)
        adapter.merge()
        torch.testing.assert_close(inputs(model), on, atol=1e-4, rtol=1e-4)
        adapter.unmerge()
        assert torch.equal(inputs(model), on)


def test_peft_oft_trains_its_own_parameters():
    preset = benchmark.PRESETS["tiny"]
    model = benchmark.build_model(preset, torch.device("cpu"))
    adapter = benchmark.Adapter(benchmark.METHODS["peft-oft"], model, ["to_q", "to_k", "to_v", "to_out.0"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("oft_" in n for n in names) and adapter.trainable_parameters()


def _gpu_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "scripts" / "gpu_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_gpu_script_refuses_without_cuda_and_checks_its_format_on_the_cpu(tmp_path, capsys):
    script = _gpu_script()
    assert script.main([str(tmp_path / "refused")]) == 2
    assert "no CUDA" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    argv = [
        str(out),
        "--allow-cpu",
        "--methods",
        "boft-b8-m2",
        "--rounds",
        "1",
        "--timed-steps",
        "1",
        "--memory-configurations",
        "boft",
    ]
    assert script.main(argv) == 0
    text = (out / "bench-gpu.md").read_text()
    assert text.startswith("# BOFT benchmark on CPU") and "## tiny, 16×16 latents, 1 round(s)" in text
    assert "| method |" in text and "| BOFT b=8, m=2 |" in text
    assert "### Peak memory per configuration" in text and "| configuration |" in text
    report = json.loads((out / "bench-gpu.json").read_text())
    (tiny,) = report["reports"]
    assert set(tiny["summary"]) == {"boft-b8-m2"} and tiny["latent_size"] == 16
    assert set(tiny["memory"]["runs"]) == {"boft"} and tiny["memory"]["runs"]["boft"]["peak_memory_bytes"] > 0


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
        assert preset.name == name and preset.shape in benchmark.MODEL_SHAPES


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
    assert benchmark.present_targets(flux, benchmark.MODEL_SHAPES["flux"].targets) == [
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


def test_lora_rank_matches_a_parameter_budget_on_linear_and_conv_layers():
    """A rank-r LoRA holds r * (d_in + d_out) on a Linear and r * (c_in * k * k + c_out) on a Conv2d
    (PEFT's lora_A is a conv of the layer's kernel, lora_B a 1 x 1 conv)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Conv2d(8, 4, 3))
    assert benchmark.lora_width(model[0]) == 48 and benchmark.lora_width(model[1]) == 8 * 9 + 4
    rank = benchmark.lora_rank_for(model, 3 * (48 + 76))
    assert rank == 3
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=["0", "1"]), model)
    held = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert held == 3 * (48 + 76)
    assert benchmark.lora_rank_for([torch.nn.Linear(4, 4)], 1) == 1  # never below one


def test_lora_rank_refuses_layers_it_cannot_size():
    with pytest.raises(TypeError, match="Linear and Conv2d"):
        benchmark.lora_width(torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no layers"):
        benchmark.lora_rank_for([], 10)
