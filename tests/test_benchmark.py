"""Benchmark smoke test on the tiny preset: every measurement is there and the table renders (no timing
assertions: speed is measured by the benchmark, never asserted in tests)."""

from __future__ import annotations

import json

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

    unet = benchmark.build_unet(benchmark.PRESETS["tiny"], torch.device("cpu"))
    tiny = build_tiny_pipeline(seed=0).unet
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == {
        k: tuple(v.shape) for k, v in tiny.state_dict().items()
    }
    benchmark.Adapter(benchmark.METHODS["boft-b8-m1"], unet, UNET_ATTENTION_TARGETS)
    adapted = boft_layers(unet)
    assert adapted and all(name.endswith(tuple(UNET_ATTENTION_TARGETS)) for name in adapted)
