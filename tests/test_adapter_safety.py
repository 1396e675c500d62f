"""Adapter safety on the tiny pipeline: non-finite adapters are refused, adapter biases live with the adapter.

- Non-finite tensors are refused when an adapter is read or loaded (every source), when it is merged
  (safe or not, the model stays untouched) and when it is exported; the CLI reports one ``error:`` line.
- Broken ``boft_config`` metadata (deeply nested, wrong JSON type) is one error line in ``inspect``.
- A trained bias belongs to its adapter: loading, strength 0 and unloading never change the base
  model's own tensors; merge folds the bias in and unmerge restores it bit for bit.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch
from conftest import sample_images
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from boft_diffusion import (
    AdapterFormatError,
    BOFTConfig,
    BOFTModel,
    add_boft,
    add_boft_to_pipeline,
    load_boft_weights,
    merge_boft,
    save_boft_weights,
    save_peft_adapter,
    set_boft_adapters,
    unload_boft,
    unmerge_boft,
)
from boft_diffusion.commands import export as export_cmd
from boft_diffusion.commands import inspect as inspect_cmd
from boft_diffusion.commands import merge as merge_cmd
from boft_diffusion.commands import sample as sample_cmd
from boft_diffusion.export import export_merged
from boft_diffusion.inject import adapter_state_dict, boft_layers, merge_adapters, remove_boft
from boft_diffusion.io import ADAPTER_WEIGHTS_NAME, read_adapter, read_peft_adapter, write_adapter
from boft_diffusion.pipeline import delete_boft_adapter
from boft_diffusion.tiny import build_tiny_pipeline, save_tiny_pipeline

COMPONENTS = ("unet", "text_encoder")


def fresh_pipe():
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in COMPONENTS for k, v in getattr(pipe, c).state_dict().items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal values (a NaN equals a NaN in the same place)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_same_state(pipe, expected: dict[str, torch.Tensor]) -> None:
    now = state(pipe)
    assert now.keys() == expected.keys()
    changed = [k for k in expected if not same(now[k], expected[k])]
    assert not changed, changed[:5]


def trained_pipe(bias: str = "boft_only", name: str = "default", seed: int = 0):
    """Random (trained-looking) adapters on UNet and text encoder, with trained biases."""
    pipe = fresh_pipe()
    torch.manual_seed(seed)
    configs = {
        "unet": BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False, bias=bias),
        "text_encoder": BOFTConfig(boft_block_size=4, init_weights=False, bias=bias),
    }
    add_boft_to_pipeline(pipe, configs, name)
    with torch.no_grad():
        for comp in COMPONENTS:
            for key, tensor in adapter_state_dict(getattr(pipe, comp), name).items():
                if key.endswith(".bias"):
                    tensor.add_(0.05 * torch.randn_like(tensor))
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{bias mode: adapter folder}`` plus the base images of a fresh pipeline."""
    root = tmp_path_factory.mktemp("adapters")
    out = {
        mode: save_boft_weights(trained_pipe(mode), root / mode).parent
        for mode in ("none", "boft_only", "all")
    }
    out["base_images"] = sample_images(fresh_pipe())
    return out


def write_nan_adapter(folder, value: float = float("nan")):
    """A project adapter file whose last UNet scale holds a non-finite value (written without checks)."""
    adapter = read_adapter(save_boft_weights(trained_pipe("none"), folder))
    key = sorted(k for k in adapter.tensors["unet"] if k.endswith(".boft_s"))[-1]
    adapter.tensors["unet"][key] = adapter.tensors["unet"][key].clone()
    adapter.tensors["unet"][key][0] = value
    write_adapter(adapter, folder)
    return folder, f"unet.{key}"


# --- non-finite adapters are refused at load --------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_read_adapter_refuses_non_finite_tensor_naming_file_and_key(tmp_path, value):
    folder, key = write_nan_adapter(tmp_path / "bad", value)
    with pytest.raises(AdapterFormatError, match="non-finite") as info:
        read_adapter(folder)
    assert str(folder / ADAPTER_WEIGHTS_NAME) in str(info.value) and key in str(info.value)


@pytest.mark.parametrize("source", ["file", "state_dict", "peft"])
def test_load_refuses_non_finite_from_every_source_and_leaves_pipeline_untouched(tmp_path, source):
    if source == "peft":
        pipe = trained_pipe("none")
        layer = list(boft_layers(pipe.text_encoder).values())[-1]
        with torch.no_grad():
            layer.boft_R["default"][0, 0, 0] = float("nan")
        path = save_peft_adapter(pipe, tmp_path / "peft")
    else:
        folder, _ = write_nan_adapter(tmp_path / "bad")
        path = folder
        if source == "state_dict":
            with safe_open(folder / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
                path = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    pipe = fresh_pipe()
    before = state(pipe)
    with pytest.raises(AdapterFormatError, match="non-finite"):
        load_boft_weights(pipe, path)
    assert not boft_layers(pipe.unet) and not boft_layers(pipe.text_encoder)
    assert_same_state(pipe, before)
    if source == "peft":
        with pytest.raises(AdapterFormatError, match="non-finite"):
            read_peft_adapter(tmp_path / "peft")


# --- non-finite merges are refused, the model untouched ----------------------------------------------
def broken_pipe():
    """Adapters on both components; only the LAST UNet layer's scale is NaN."""
    pipe = trained_pipe("boft_only")
    with torch.no_grad():
        list(boft_layers(pipe.unet).values())[-1].boft_s["default"][0] = float("nan")
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("how", ["merge_boft", "merge_boft_safe", "merge_adapters", "layer"])
def test_non_finite_merge_is_refused_before_anything_is_written(how):
    pipe = broken_pipe()
    before = state(pipe)
    with pytest.raises(ValueError, match="[Nn]on-finite"):
        if how == "merge_boft":
            merge_boft(pipe)
        elif how == "merge_boft_safe":
            merge_boft(pipe, safe_merge=True)
        elif how == "merge_adapters":
            merge_adapters(pipe.unet)
        else:
            list(boft_layers(pipe.unet).values())[-1].merge()
    for comp in COMPONENTS:
        assert not any(layer.merged for layer in boft_layers(getattr(pipe, comp)).values())
    assert_same_state(pipe, before)
    unload_boft(pipe)
    assert_same_state(pipe, state(fresh_pipe()))


def test_merge_and_unload_refuses_non_finite():
    text_encoder = fresh_pipe().text_encoder
    before = copy.deepcopy(text_encoder.state_dict())
    model = BOFTModel(text_encoder, BOFTConfig(boft_block_size=4, init_weights=False))
    with torch.no_grad():
        list(boft_layers(text_encoder).values())[-1].boft_R["default"].fill_(float("inf"))
    for safe_merge in (False, True):
        with pytest.raises(ValueError, match="[Nn]on-finite"):
            model.merge_and_unload(safe_merge=safe_merge)
        assert boft_layers(text_encoder) and not any(
            layer.merged for layer in boft_layers(text_encoder).values()
        )
    model.unload()
    after = text_encoder.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_export_refuses_non_finite_merged_weight(tmp_path):
    pipe = broken_pipe()
    for fmt, out in (("diffusers", tmp_path / "folder"), ("single_file", tmp_path / "one.safetensors")):
        with pytest.raises(ValueError, match="[Nn]on-finite"):
            export_merged(pipe, out, format=fmt)
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# --- the CLI: one error line, exit 2, nothing written -----------------------------------------------
def invoke(command, argv: list) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args([str(a) for a in argv]))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_pipeline(root / "base")
    nan, _ = write_nan_adapter(root / "nan")
    return {"base": base, "nan": nan}


@pytest.mark.parametrize("verb", ["sample", "merge", "export"])
def test_cli_refuses_non_finite_adapter(cli_files, tmp_path, verb, capsys):
    if verb == "sample":
        command, out = sample_cmd, tmp_path / "grid.png"
        argv = ["--base", cli_files["base"], "--adapter", cli_files["nan"], "--prompt", "p", "--steps", 1]
        argv += ["--height", 32, "--width", 32, "--num-images", 1, "--out", out]
    else:
        command = merge_cmd if verb == "merge" else export_cmd.COMMAND
        out = tmp_path / "merged"
        argv = ["--base", cli_files["base"], "--adapter", cli_files["nan"], "--out", out]
    assert invoke(command, argv) == 2
    assert "non-finite" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_inspect_refuses_non_finite_adapter_in_one_line(cli_files, capsys):
    assert invoke(inspect_cmd, [cli_files["nan"]]) == 2
    assert "non-finite" in one_error_line(capsys)


@pytest.mark.parametrize(
    "config",
    [
        "[" * 10000 + "]" * 10000,
        '{"unet": ' * 5000 + "{}" + "}" * 5000,
        '{"unet": {"' + "x" * 1_000_000 + '": 1}}',
        "[]",
        "null",
        '{"unet": 5}',
        "{",
    ],
    ids=["nested-list", "nested-object", "huge-key", "list", "null", "not-a-config", "malformed"],
)
def test_inspect_broken_config_metadata_is_one_error_line(tmp_path, config, capsys):
    path = tmp_path / "broken.safetensors"
    metadata = {"format": "boft_diffusion", "format_version": "1", "boft_config": config}
    save_file({"unet.x.boft_R": torch.zeros(1, 1, 1)}, path, metadata=metadata)
    assert invoke(inspect_cmd, [path]) == 2
    message = one_error_line(capsys)
    assert "boft_config" in message and str(path) in message and len(message) < 1000
    with pytest.raises(AdapterFormatError):
        read_adapter(path)


# --- adapter biases live with the adapter -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("bias", ["none", "boft_only", "all"])
def test_load_then_unload_restores_every_base_tensor(saved, bias):
    expected = state(fresh_pipe())
    pipe = fresh_pipe()
    load_boft_weights(pipe, saved[bias])
    unload_boft(pipe)
    assert_same_state(pipe, expected)
    for undo in ("remove", "delete"):
        pipe = fresh_pipe()
        load_boft_weights(pipe, saved[bias])
        if undo == "remove":
            for comp in COMPONENTS:
                remove_boft(getattr(pipe, comp), keep_merged=False)
        else:
            delete_boft_adapter(pipe, "default")
        assert_same_state(pipe, expected)


@pytest.mark.slow
@pytest.mark.parametrize("bias", ["none", "boft_only"])
def test_strength_zero_is_exactly_the_base_model(saved, bias):
    pipe = fresh_pipe()
    load_boft_weights(pipe, saved[bias])
    adapter_images = sample_images(pipe)
    assert not np.array_equal(adapter_images, saved["base_images"])
    set_boft_adapters(pipe, "default", 0.0)
    np.testing.assert_array_equal(sample_images(pipe), saved["base_images"])
    set_boft_adapters(pipe, "default", 1.0)
    np.testing.assert_array_equal(sample_images(pipe), adapter_images)


@pytest.mark.slow
def test_trained_bias_reaches_the_output_through_the_adapter(saved):
    """Loading the boft_only file gives the same images as the pipeline that trained it."""
    pipe = trained_pipe("boft_only")
    loaded = fresh_pipe()
    load_boft_weights(loaded, saved["boft_only"])
    np.testing.assert_array_equal(sample_images(loaded), sample_images(pipe))
    file_bias = {
        k: t for k, t in read_adapter(saved["boft_only"]).tensors["unet"].items() if k.endswith(".bias")
    }
    assert file_bias
    for key, tensor in adapter_state_dict(loaded.unet).items():
        if key.endswith(".bias"):
            assert torch.equal(tensor, file_bias[key])


@pytest.mark.slow
def test_merge_folds_bias_in_and_unmerge_restores_it(saved):
    base = fresh_pipe()
    pipe = fresh_pipe()
    load_boft_weights(pipe, saved["boft_only"])
    unmerged = sample_images(pipe)
    trained = {k: t.clone() for k, t in adapter_state_dict(pipe.unet).items() if k.endswith(".bias")}
    merge_boft(pipe)
    assert np.abs(sample_images(pipe) - unmerged).max() < 1e-4
    layers = boft_layers(pipe.unet)
    for key, tensor in trained.items():
        torch.testing.assert_close(
            layers[key.removesuffix(".bias")].base_layer.bias, tensor, rtol=0, atol=1e-7
        )
    unmerge_boft(pipe)
    base_state = base.unet.state_dict()
    for path, layer in layers.items():
        if layer.base_layer.bias is not None:
            assert torch.equal(layer.base_layer.bias, base_state[f"{path}.bias"]), path


def test_boft_only_trains_the_adapter_bias_not_the_base_bias():
    base = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4))
    original = copy.deepcopy(base.state_dict())
    model = add_boft(base, BOFTConfig(boft_block_size=4, target_modules=["0"], bias="boft_only"))
    layer = boft_layers(model)["0"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not layer.base_layer.bias.requires_grad
    assert {n for n in trainable if "bias" in n} == {"0.boft_bias.default"}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 16)).square().sum().backward()
    assert layer.boft_bias["default"].grad is not None and layer.boft_bias["default"].grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(layer.boft_bias["default"], original["0.bias"])
    assert torch.equal(layer.base_layer.bias, original["0.bias"])
    assert torch.equal(adapter_state_dict(model)["0.bias"], layer.boft_bias["default"])


def test_adapter_biases_compose_by_strength():
    """Bias in effect: ``b + sum_a w_a (b_a - b)`` (identity rotations, so only the bias differs)."""
    base = nn.Linear(8, 4)
    model = add_boft(
        nn.Sequential(base), BOFTConfig(boft_block_size=4, target_modules=["0"], bias="boft_only")
    )
    add_boft(model, BOFTConfig(boft_block_size=2, target_modules=["0"], bias="boft_only"), "second")
    layer = boft_layers(model)["0"]
    with torch.no_grad():
        layer.boft_bias["default"].add_(1.0)
        layer.boft_bias["second"].sub_(2.0)
    layer.set_active(["default", "second"], {"default": 0.5, "second": 0.25})
    x = torch.randn(3, 8)
    b = base.bias.detach()
    expected = x @ base.weight.detach().T + b + 0.5 * 1.0 + 0.25 * -2.0
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
