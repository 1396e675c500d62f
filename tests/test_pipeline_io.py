"""Pipeline verbs and the adapter file format on the tiny StableDiffusionPipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import sample_images
from safetensors import safe_open
from safetensors.torch import save_file

from boft_diffusion import (
    AdapterFormatError,
    BOFTConfig,
    add_boft_to_pipeline,
    disable_boft,
    enable_boft,
    load_boft_weights,
    merge_boft,
    save_boft_weights,
    set_boft_adapters,
    unload_boft,
    unmerge_boft,
)
from boft_diffusion.inject import boft_layers
from boft_diffusion.io import ADAPTER_WEIGHTS_NAME, FORMAT_VERSION
from boft_diffusion.pipeline import boft_adapters
from boft_diffusion.tiny import build_tiny_pipeline

UNET = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False, bias="boft_only")
TEXT = BOFTConfig(boft_block_size=4, init_weights=False)


def trained_pipe(seed: int = 0):
    pipe = build_tiny_pipeline(seed=0, weights="random")
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)
    add_boft_to_pipeline(pipe, {"unet": UNET, "text_encoder": TEXT})
    return pipe


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{k}": v.clone()
        for c in ("unet", "text_encoder")
        for k, v in getattr(pipe, c).state_dict().items()
    }


def assert_unchanged(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture
def saved_adapter(tmp_path):
    pipe = trained_pipe()
    save_boft_weights(pipe, tmp_path / "adapter", metadata={"base_model": "tiny"})
    return pipe, tmp_path / "adapter"


def test_file_format(saved_adapter):
    _, folder = saved_adapter
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_WEIGHTS_NAME]  # no temp files left
    with safe_open(folder / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["format_version"] == FORMAT_VERSION and meta["base_model"] == "tiny"
    assert set(json.loads(meta["boft_config"])) == {"unet", "text_encoder"}
    assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)
    assert all(k.endswith((".boft_R", ".boft_s", ".bias")) for k in keys)
    assert not any("base_layer" in k or "perm" in k for k in keys)


def test_save_load_reproduces_images_exactly(saved_adapter):
    pipe, folder = saved_adapter
    expected = sample_images(pipe)
    fresh = build_tiny_pipeline(seed=0, weights="random")
    fresh.set_progress_bar_config(disable=True)
    base = sample_images(fresh)
    assert load_boft_weights(fresh, folder) == "default"
    loaded = sample_images(fresh)
    assert np.array_equal(loaded, expected)
    assert np.abs(loaded - base).max() > 1e-3  # the adapter does something
    unload_boft(fresh)
    assert np.array_equal(sample_images(fresh), base)


def test_load_from_file_and_state_dict(saved_adapter):
    pipe, folder = saved_adapter
    expected = sample_images(pipe)
    by_file = build_tiny_pipeline(seed=0, weights="random")
    load_boft_weights(by_file, folder / ADAPTER_WEIGHTS_NAME, adapter_name="subject")
    assert boft_adapters(by_file) == {"unet": ["subject"], "text_encoder": ["subject"]}
    by_dict = build_tiny_pipeline(seed=0, weights="random")
    with safe_open(folder / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    load_boft_weights(by_dict, state)
    for p in (by_file, by_dict):
        p.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(sample_images(p), expected)


def test_merged_images_match_unmerged_and_unmerge_restores(saved_adapter):
    pipe, _ = saved_adapter
    unmerged = sample_images(pipe)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    merge_boft(pipe, safe_merge=True, progressbar=False)
    merged = sample_images(pipe)
    assert np.abs(merged - unmerged).max() < 1e-4
    merge_boft(pipe)  # merging twice changes nothing
    np.testing.assert_array_equal(sample_images(pipe), merged)
    unmerge_boft(pipe)
    for key, value in pipe.unet.state_dict().items():
        if "weight" in key and value.norm() > 0:
            assert ((value - before[key]).norm() / before[key].norm()).item() < 1e-6, key


def test_strength_zero_is_base_one_is_adapter(saved_adapter):
    pipe, _ = saved_adapter
    adapter = sample_images(pipe)
    base_pipe = build_tiny_pipeline(seed=0, weights="random")
    base_pipe.set_progress_bar_config(disable=True)
    base = sample_images(base_pipe)
    set_boft_adapters(pipe, "default", 0.0)
    np.testing.assert_array_equal(sample_images(pipe), base)
    set_boft_adapters(pipe, ["default"], [0.5])
    half = sample_images(pipe)
    assert not np.array_equal(half, base) and not np.array_equal(half, adapter)
    set_boft_adapters(pipe, ["default"], [1.0])
    np.testing.assert_array_equal(sample_images(pipe), adapter)
    for layer in boft_layers(pipe.unet).values():
        blocks, _, _ = layer.rotation("default", strength=0.37)
        torch.testing.assert_close(
            blocks @ blocks.transpose(-1, -2), torch.eye(4).expand_as(blocks), atol=1e-5, rtol=0
        )


def test_disable_enable(saved_adapter):
    pipe, _ = saved_adapter
    adapter = sample_images(pipe)
    disable_boft(pipe)
    base = sample_images(pipe)
    enable_boft(pipe)
    np.testing.assert_array_equal(sample_images(pipe), adapter)
    assert not np.array_equal(base, adapter)
    merge_boft(pipe)
    disable_boft(pipe)  # unmerges first: base again, up to fp32 roundoff of the unmerge
    np.testing.assert_allclose(sample_images(pipe), base, atol=1e-5)
    enable_boft(pipe)
    np.testing.assert_allclose(sample_images(pipe), adapter, atol=1e-5)


def test_two_adapters_blend(tmp_path):
    pipe = trained_pipe(seed=1)
    torch.manual_seed(2)
    add_boft_to_pipeline(pipe, {"unet": BOFTConfig(boft_block_size=8, init_weights=False)}, "style")
    set_boft_adapters(pipe, ["default", "style"], [1.0, 0.5])
    assert all(layer.strength.get("style", 0.5) == 0.5 for layer in boft_layers(pipe.unet).values())
    with pytest.raises(ValueError, match="Unknown BOFT adapter"):
        set_boft_adapters(pipe, ["nope"])


# --- bad input: a clear error naming the file/module, pipeline unchanged -------------------
def _expect_failure(tmp_path, source, match, **kwargs):
    pipe = build_tiny_pipeline(seed=0, weights="random")
    before = snapshot(pipe)
    with pytest.raises((AdapterFormatError, FileNotFoundError, ValueError), match=match):
        load_boft_weights(pipe, source, **kwargs)
    assert_unchanged(pipe, before)
    assert not boft_adapters(pipe)
    return pipe


def test_missing_path(tmp_path):
    _expect_failure(tmp_path, tmp_path / "nope", "nope: no such adapter")


def test_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect_failure(tmp_path, tmp_path / "empty", f"no {ADAPTER_WEIGHTS_NAME}")


def test_not_safetensors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04 this is a pickle, not safetensors")
    _expect_failure(tmp_path, bad, "bad.safetensors: not a readable safetensors file")


def test_truncated_file(saved_adapter, tmp_path):
    _, folder = saved_adapter
    data = (folder / ADAPTER_WEIGHTS_NAME).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    _expect_failure(tmp_path, cut, "cut.safetensors: not a readable safetensors file")


def test_plain_safetensors_without_metadata(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    _expect_failure(tmp_path, tmp_path / "plain.safetensors", "not a boft_diffusion adapter")


def test_wrong_component(saved_adapter, tmp_path):
    _, folder = saved_adapter
    pipe = build_tiny_pipeline(seed=0, weights="random")
    pipe.text_encoder = None
    with pytest.raises(AdapterFormatError, match="'text_encoder', the pipeline has no such component"):
        load_boft_weights(pipe, folder)
    assert not boft_adapters(pipe)


def _rewrite(folder, tmp_path, edit_tensors=None, edit_config=None):
    with safe_open(folder / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        configs = json.loads(meta["boft_config"])
        edit_config(configs)
        meta["boft_config"] = json.dumps(configs)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, out, metadata=meta)
    return out


def test_shape_mismatch_names_module(saved_adapter, tmp_path):
    _, folder = saved_adapter

    def shrink(tensors):
        key = next(k for k in tensors if k.startswith("unet.") and k.endswith("to_k.boft_s"))
        tensors[key] = tensors[key][:-1]

    _expect_failure(
        tmp_path, _rewrite(folder, tmp_path, shrink), r"to_k.boft_s has shape \(\d+,\), the model needs"
    )


def test_target_mismatch_names_module(saved_adapter, tmp_path):
    _, folder = saved_adapter

    def rename(tensors):
        key = next(k for k in tensors if k.startswith("unet.") and k.endswith("to_q.boft_R"))
        tensors[key.replace("to_q", "to_z")] = tensors.pop(key)

    _expect_failure(tmp_path, _rewrite(folder, tmp_path, rename), "to_z.boft_R")


def test_config_that_does_not_fit(saved_adapter, tmp_path):
    _, folder = saved_adapter

    def bigger(configs):
        configs["unet"]["boft_block_size"] = 7

    _expect_failure(
        tmp_path, _rewrite(folder, tmp_path, edit_config=bigger), "adapter does not fit unet.*block_size=7"
    )


def test_unknown_config_key(saved_adapter, tmp_path):
    _, folder = saved_adapter

    def typo(configs):
        configs["unet"]["boft_blok_size"] = 4

    _expect_failure(tmp_path, _rewrite(folder, tmp_path, edit_config=typo), "did you mean 'boft_block_size'")


def test_duplicate_adapter_name_refused(saved_adapter):
    pipe, folder = saved_adapter
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        load_boft_weights(pipe, folder)


def test_atomic_save_keeps_previous_file_on_failure(saved_adapter, monkeypatch):
    pipe, folder = saved_adapter
    original = (folder / ADAPTER_WEIGHTS_NAME).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("boft_diffusion.io.format.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_boft_weights(pipe, folder)
    assert (folder / ADAPTER_WEIGHTS_NAME).read_bytes() == original
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_WEIGHTS_NAME]
