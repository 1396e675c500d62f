"""Merge, unmerge, the finiteness check and export are deterministic in any module mode (issue 9).

Multiplicative dropout belongs to the training forward pass only: a model still in ``train()`` mode
merges the adapter's full rotation, and unmerge undoes exactly that. Layers: ``nn.Linear``,
transformers' ``Conv1D`` (weight stored ``(in, out)``) and ``nn.Conv2d``, each with
``boft_dropout=0.5`` and two butterfly factors.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import sample_images
from torch import nn
from transformers.pytorch_utils import Conv1D

from boft_diffusion import BOFTConfig, BOFTModel, add_boft_to_pipeline
from boft_diffusion import export as export_module
from boft_diffusion.export import export_merged
from boft_diffusion.inject import boft_layers
from boft_diffusion.tiny import build_tiny_pipeline

CONFIG = dict(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5, init_weights=False)


def make(kind: str) -> tuple[BOFTModel, torch.Tensor]:
    """A one-layer model with a random adapter (dropout 0.5, m = 2) and an input for it."""
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(32, 24), torch.randn(40, 32)  # 40 tokens: the weight-rotation path
    elif kind == "linear_input_path":
        base, x = nn.Linear(32, 24), torch.randn(3, 32)  # 3 tokens: the input-rotation path
    elif kind == "conv1d":
        base, x = Conv1D(24, 32), torch.randn(40, 32)  # nf=24 outputs, nx=32 inputs
    else:
        base, x = nn.Conv2d(4, 6, 2), torch.randn(2, 4, 5, 5)  # rotated axis 4 * 2 * 2 = 16
    config = BOFTConfig(target_modules=["0"], fan_in_fan_out=kind == "conv1d", **CONFIG)
    model = BOFTModel(nn.Sequential(base), config)
    return model, x


KINDS = ["linear", "linear_input_path", "conv1d", "conv2d"]


@pytest.mark.parametrize("kind", KINDS)
def test_rotation_and_merged_weight_are_deterministic_in_train_mode(kind):
    model, _ = make(kind)
    layer = boft_layers(model.model)["0"]
    model.train()
    first, second = layer.rotation("default")[0], layer.rotation("default")[0]
    assert torch.equal(first, second)
    weight = layer.merged_weight()
    assert weight.shape == layer.base_layer.weight.shape
    assert torch.equal(weight, layer.merged_weight())
    model.eval()
    assert torch.equal(weight, layer.merged_weight())
    assert torch.equal(layer.merged_weight(["default"]), weight)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_merged_output_equals_eval_unmerged_output(kind, mode):
    model, x = make(kind)
    layer = boft_layers(model.model)["0"]
    original = layer.base_layer.weight.detach().clone()
    model.eval()
    with torch.no_grad():
        reference = model(x)
    model.train(mode == "train")
    with torch.no_grad():
        model.merge_adapter()
        merged_weight = layer.base_layer.weight.detach().clone()
        for module_mode in (True, False):
            model.train(module_mode)
            torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    model.train(mode == "train")
    model.unmerge_adapter()
    restored = layer.base_layer.weight.detach()
    assert ((restored - original).norm() / original.norm()).item() < 1e-6
    assert not torch.equal(merged_weight, original)


@pytest.mark.parametrize("kind", KINDS)
def test_train_forward_still_uses_dropout(kind):
    model, x = make(kind)
    model.train()
    outputs = [model(x) for _ in range(8)]
    assert any(not torch.equal(outputs[0], out) for out in outputs[1:])


def test_layer_merge_has_no_dead_safe_merge_argument():
    model, _ = make("linear")
    layer = boft_layers(model.model)["0"]
    assert "safe_merge" not in inspect.signature(layer.merge).parameters
    assert layer.pending_adapters() == ["default"]
    layer.merge()
    assert layer.pending_adapters() == []


def test_export_uses_only_public_layer_verbs():
    import importlib
    import pkgutil

    modules = [export_module] + [
        importlib.import_module(f"{export_module.__name__}.{info.name}")
        for info in pkgutil.iter_modules(export_module.__path__)
    ]
    assert len(modules) > 1
    for module in modules:
        source = inspect.getsource(module)
        assert "_pending_adapters" not in source and ".training" not in source, module.__name__


def test_export_of_a_train_mode_pipeline_equals_eval_outputs(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = build_tiny_pipeline(seed=0, weights="random")
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    configs = {
        "unet": BOFTConfig(**CONFIG, bias="boft_only"),
        "text_encoder": BOFTConfig(boft_block_size=4, boft_dropout=0.5, init_weights=False),
    }
    add_boft_to_pipeline(pipe, configs)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    reference = sample_images(pipe)
    pipe.unet.train()
    pipe.text_encoder.train()
    export_merged(pipe, tmp_path / "merged")
    assert pipe.unet.training and pipe.text_encoder.training
    assert all(layer.training for layer in boft_layers(pipe.unet).values())
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(sample_images(loaded) - reference).max() < 1e-4


def test_a_merged_adapter_keeps_its_strength_until_unmerged():
    model, x = make("linear")
    model.eval()
    layer = boft_layers(model.model)["0"]
    original = layer.base_layer.weight.detach().clone()
    layer.set_active(["default"], {"default": 0.5})
    with torch.no_grad():
        half = model(x)
        model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        layer.set_active(["default"], {"default": 1.0})
    assert layer.strength["default"] == 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(x), half, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert ((layer.base_layer.weight - original).norm() / original.norm()).item() < 1e-6
