"""``boft-diffusion bench --memory``: a row per configuration with its own worker's figures, the quantized bases
built layer by layer, the table and its failed and unavailable rows. Structure only: on the tiny preset the
process's runtime dwarfs what the savers save, so no direction between configurations is asserted."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from boft_diffusion import benchmark, cli
from boft_diffusion.benchmark import memory

TINY_ARGS = ["--preset", "tiny", "--latent-size", "8", "--timed-steps", "2"]


@pytest.mark.slow
def test_memory_mode_reports_every_configuration_from_its_own_worker(tmp_path, capsys):
    configurations = ["floor", "lora", "boft", "boft-checkpointing", "boft-adamw8bit"]
    out = tmp_path / "memory.json"
    argv = ["bench", "--memory", *TINY_ARGS, "--configurations", *configurations, "--json", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["configurations"] == configurations and report["steps"] == 2
    assert not report["failed"] and set(report["runs"]) == set(configurations)
    for key, run in report["runs"].items():
        assert run["configuration"] == key and run["input_shape"] == [1, 4, 8, 8]
        assert 0 < run["runtime_bytes"] <= run["model_bytes"] <= run["peak_memory_bytes"]
        assert (run["trainable_params"] > 0) == (key != "floor")
    rows = {row["key"]: row for row in report["rows"]}
    assert rows["boft"]["peak_vs_boft"] == 1.0 and all(row["peak_mb"] > 0 for row in rows.values())
    assert rows["boft-checkpointing"]["trainable_params"] == rows["boft"]["trainable_params"]
    printed = capsys.readouterr().out
    assert "| configuration |" in printed and "| BOFT + gradient checkpointing |" in printed
    assert "ru_maxrss" in printed


@pytest.mark.slow
def test_worker_trains_with_8bit_adamw_on_the_cpu():
    """bitsandbytes' AdamW8bit steps CPU tensors (0.50): the row is measured, not unavailable."""
    preset = benchmark.with_overrides(benchmark.PRESETS["tiny"], latent_size=8)
    result = benchmark.measure_memory(
        benchmark.MEMORY_CONFIGURATIONS["boft-adamw8bit"], preset, "cpu", steps=2
    )
    assert result["trainable_params"] > 0 and result["peak_memory_bytes"] > 0
    assert torch.isfinite(torch.tensor(result["loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchao-int8", "quanto-int8"])
def test_quantized_base_is_built_one_layer_at_a_time(backend):
    pytest.importorskip("torchao" if backend.startswith("torchao") else "optimum.quanto")
    preset = benchmark.PRESETS["tiny"]
    plain = benchmark.build_model(preset, torch.device("cpu"))
    quantized = benchmark.build_model(preset, torch.device("cpu"), quantize=memory.quantizer(backend))
    linears = {n: m for n, m in plain.named_modules() if type(m) is nn.Linear}
    modules = dict(quantized.named_modules())
    assert linears and set(linears) <= set(modules)
    for name in linears:
        weight = modules[name].weight
        assert type(weight) is not nn.Parameter or weight.dtype == torch.int8, name  # a quantized tensor
        assert not weight.requires_grad
    assert not any(p.is_meta for p in quantized.parameters())


def test_quantizer_names_its_backends():
    assert memory.quantizer("none") is None
    with pytest.raises(ValueError, match="torchao-int8, quanto-int8, bnb-nf4 or bnb-int8"):
        memory.quantizer("hqq-4bit")


def test_the_cpu_default_leaves_the_bitsandbytes_bases_out_and_cuda_measures_all():
    assert memory.default_configurations("cuda") == list(benchmark.MEMORY_CONFIGURATIONS)
    cpu = memory.default_configurations("cpu")
    assert "boft-bnb-nf4" not in cpu and "boft-bnb-int8" not in cpu and "boft-quanto-int8" in cpu


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["bnb-nf4", "bnb-int8"])
def test_the_bitsandbytes_quantizer_leaves_a_quantized_layer(backend):
    from boft_diffusion.quantized import quantization_of

    layer = memory.quantizer(backend)(torch.nn.Linear(64, 32).requires_grad_(False))
    assert quantization_of(layer) == backend


def test_a_missing_package_makes_a_configuration_unavailable(monkeypatch):
    monkeypatch.setattr(memory, "find_spec", lambda name: None if name == "bitsandbytes" else object())
    configs = list(benchmark.MEMORY_CONFIGURATIONS.values())
    unavailable = memory.memory_unavailable(configs)
    assert set(unavailable) == {"boft-adamw8bit", "boft-bnb-nf4", "boft-bnb-int8", "boft-all"}
    assert "bitsandbytes" in unavailable["boft-adamw8bit"]


def _run(key: str, runtime: float, model: float, peak: float) -> dict:
    mb = 1024**2
    return {"configuration": key, "trainable_params": 0 if key == "floor" else 100,
            "runtime_bytes": runtime * mb, "model_bytes": model * mb, "peak_memory_bytes": peak * mb}  # fmt: skip


def test_table_has_a_row_per_configuration_with_ratios_to_boft_and_the_reasons():
    report = {
        "device": "cpu",
        "steps": 3,
        "configurations": ["floor", "boft", "boft-checkpointing", "boft-torchao-int8", "boft-quanto-int8"],
        "runs": {
            "floor": _run("floor", 400, 500, 550),
            "boft": _run("boft", 400, 500, 600),
            "boft-checkpointing": _run("boft-checkpointing", 400, 500, 540),
        },
        "failed": {"boft-torchao-int8": "NotImplementedError: Int8Tensor dispatch"},
        "unavailable": {"boft-quanto-int8": "quanto-int8 needs optimum.quanto"},
    }
    rows = {row["key"]: row for row in memory.memory_rows(report)}
    assert list(rows) == report["configurations"]
    assert rows["boft"]["increment_mb"] == 100 and rows["boft"]["model_mb"] == 100
    assert rows["boft-checkpointing"]["peak_vs_boft"] == pytest.approx(0.9)
    assert rows["boft-checkpointing"]["increment_vs_boft"] == pytest.approx(0.4)
    assert rows["floor"]["increment_vs_boft"] == pytest.approx(0.5)
    text = benchmark.format_memory_table(report)
    lines = text.splitlines()
    assert lines[0].startswith("| configuration | trainable params | runtime MB | model MB | peak MB |")
    assert "| BOFT + gradient checkpointing | 100 | 400 | 100 | 540 | 40 | 0.90 | 0.40 |" in lines
    assert "| BOFT on a torchao int8 base | — | — | — | failed | — | — | — |" in lines
    assert "failed: boft-torchao-int8 (BOFT on a torchao int8 base): NotImplementedError" in text
    assert "unavailable: boft-quanto-int8 (BOFT on a quanto int8 base): quanto-int8 needs" in text


def test_every_configuration_names_a_benchmark_method():
    for config in benchmark.MEMORY_CONFIGURATIONS.values():
        assert config.method in benchmark.METHODS
        assert config.optimizer in ("adamw", "adamw_8bit")
        assert config.quantization in ("none", *memory.QUANTIZATION_PACKAGES)
    assert "boft" in benchmark.MEMORY_CONFIGURATIONS  # the reference of "× BOFT"


def test_memory_report_runs_a_worker_per_configuration_and_keeps_the_failures(monkeypatch):
    from boft_diffusion.benchmark import runner

    calls = []

    def fake_worker(command, out, env=None):
        key = command[command.index("--worker") + 1]
        calls.append((key, command, env))
        return "RuntimeError: no" if key == "boft-checkpointing" else _run(key, 400, 500, 600)

    monkeypatch.setattr(runner, "_run_worker", fake_worker)
    configs = [benchmark.MEMORY_CONFIGURATIONS[k] for k in ("floor", "boft", "boft-checkpointing")]
    report = benchmark.memory_report(benchmark.PRESETS["tiny"], configs, "cpu", steps=2, log=lambda _: None)
    assert [key for key, _, _ in calls] == ["floor", "boft", "boft-checkpointing"]
    for _, command, env in calls:
        assert "--memory" in command and command[command.index("--steps") + 1] == "2"
        assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert set(report["runs"]) == {"floor", "boft"}
    assert report["failed"] == {"boft-checkpointing": "RuntimeError: no"}
    assert [row["key"] for row in report["rows"]] == ["floor", "boft", "boft-checkpointing"]
