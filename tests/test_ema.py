"""EMA of the trained tensors (train.ema_decay): the average itself, its place in a run (validation and
metrics use it, ema/boft_weights.safetensors holds it), and exact resume."""

from __future__ import annotations

import pytest
import torch
from conftest import DREAMBOOTH_FAST, Stop, recipe_config, stop_at

from boft_diffusion import load_boft_weights
from boft_diffusion.io import read_adapter
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, run
from boft_diffusion.tiny import build_tiny_pipeline
from boft_diffusion.training.args import ConfigError
from boft_diffusion.training.ema import AdapterEMA

FAST = [*DREAMBOOTH_FAST, "train.max_train_steps=4", "optim.learning_rate=1e-2", "train.ema_decay=0.9"]


def make_config(out, *overrides: str) -> DreamBoothConfig:
    return recipe_config(DreamBoothConfig, out, *FAST, *overrides)


def test_the_average_follows_diffusers_schedule_and_swaps_in_and_out():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([param], decay=0.9)
    expected = torch.zeros(3)
    for step in range(1, 6):
        with torch.no_grad():
            param.add_(1.0)
        ema.update()
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * param.detach()
    torch.testing.assert_close(ema.shadow[0], expected)
    with ema.applied():
        torch.testing.assert_close(param.detach(), expected)
    assert torch.equal(param.detach(), torch.full((3,), 5.0))  # the trained values are back

    again = AdapterEMA([param], decay=0.9, on_cpu=True)
    again.load_state(*ema.state())
    assert again.steps == 5 and torch.equal(again.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="averages 1 tensors, this run trains 2"):
        AdapterEMA([param, torch.nn.Parameter(torch.zeros(1))], 0.9).load_state(*ema.state())


@pytest.mark.parametrize("decay", ["1.0", "-0.1", "nan"])
def test_a_decay_outside_0_1_is_refused(tmp_path, decay):
    with pytest.raises(ConfigError, match=r"train.ema_decay must be a number in \[0, 1\)"):
        make_config(tmp_path / "run", f"train.ema_decay={decay}")


def test_a_run_saves_the_average_beside_the_adapter_and_it_loads(tmp_path):
    out = tmp_path / "run"
    run(make_config(out, "train.ema_on_cpu=true"))
    raw, averaged = read_adapter(out), read_adapter(out / "ema")
    assert averaged.metadata["ema_decay"] == "0.9" and averaged.configs.keys() == raw.configs.keys()
    differs = [
        not torch.equal(averaged.tensors[c][k], raw.tensors[c][k])
        for c in raw.tensors
        for k in raw.tensors[c]
    ]
    assert any(differs)  # four steps: the average lags the trained values
    pipe = build_tiny_pipeline(seed=0)
    load_boft_weights(pipe, out / "ema")


@pytest.mark.slow
def test_a_stopped_run_resumes_with_the_same_average(tmp_path):
    whole = tmp_path / "whole"
    run(make_config(whole, "train.checkpointing_steps=2"))
    parts = tmp_path / "parts"
    with pytest.raises(Stop):
        run(make_config(parts, "train.checkpointing_steps=2"), on_step=stop_at(3))
    run(make_config(parts, "train.checkpointing_steps=2", "train.resume_from_checkpoint=latest"))
    a, b = read_adapter(whole / "ema"), read_adapter(parts / "ema")
    for comp, tensors in a.tensors.items():
        for key, value in tensors.items():
            torch.testing.assert_close(b.tensors[comp][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resuming_needs_the_checkpoints_average(tmp_path):
    out = tmp_path / "run"
    run(make_config(out, "train.ema_decay=0", "train.max_train_steps=1", "train.checkpointing_steps=1"))
    with pytest.raises(ConfigError, match=r"holds no moving average \(ema.safetensors\)"):
        run(make_config(out, "train.max_train_steps=2", "train.resume_from_checkpoint=latest"))
    other = tmp_path / "other"
    run(make_config(other, "train.max_train_steps=1", "train.checkpointing_steps=1"))
    with pytest.raises(
        ConfigError, match=r"saved with train.ema_decay=0.9, this run has train.ema_decay=0.99"
    ):
        run(
            make_config(
                other,
                "train.ema_decay=0.99",
                "train.max_train_steps=2",
                "train.resume_from_checkpoint=latest",
            )
        )
