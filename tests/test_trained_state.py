"""The one door for trained state besides BOFT's tensors (boft_diffusion.trained_state).

A toy kind ("offset": one tensor kept on the UNet) goes through every place that handles trained state
without any of them naming it: saving, the adapter file, loading onto a fresh pipeline (checked first,
attached with the adapter or not at all), checkpoints and exact resume, unloading and deleting.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from boft_diffusion import (
    AdapterFormatError,
    BOFTConfig,
    add_boft_to_pipeline,
    delete_boft_adapter,
    load_boft_weights,
    save_boft_weights,
    unload_boft,
)
from boft_diffusion import trained_state as registry
from boft_diffusion.inject import boft_layers
from boft_diffusion.io import read_adapter
from boft_diffusion.pipeline import pipeline_components
from boft_diffusion.tiny import build_tiny_pipeline
from boft_diffusion.trained_state import (
    Attachment,
    SavedState,
    TrainedState,
    register_trained_state,
    trained_states,
)
from boft_diffusion.training.checkpoint import load_adapter_tensors
from boft_diffusion.training.sharding import full_adapter

CONFIG = BOFTConfig(boft_block_size=4, init_weights=False, target_modules=["to_q"])
ATTRIBUTE = "_toy_offsets"


class OffsetState(TrainedState):
    """One tensor per adapter, as wide as the UNet's first block, kept on the UNet module."""

    name = "offset"

    def collect(self, pipe, adapter_name, configs):
        offsets = getattr(pipeline_components(pipe)["unet"], ATTRIBUTE, {})
        if adapter_name not in offsets:
            return None
        return SavedState(
            {"value": offsets[adapter_name]}, {"offset_width": str(offsets[adapter_name].numel())}
        )

    def prepare(self, pipe, adapter, adapter_name, options):
        value = adapter.states[self.name]["value"]
        width = pipe.unet.config.block_out_channels[0]
        if value.shape != (width,):
            raise AdapterFormatError(
                f"{adapter.source}: offset of shape {tuple(value.shape)}, the UNet needs ({width},)"
            )
        unet, name = pipe.unet, adapter_name

        def attach():
            getattr(unet, ATTRIBUTE, {}) or setattr(unet, ATTRIBUTE, {})
            getattr(unet, ATTRIBUTE)[name] = value.clone()

        def detach():
            getattr(unet, ATTRIBUTE, {}).pop(name, None)

        return Attachment(attach, detach)

    def restore(self, components, adapter, adapter_name):
        current = getattr(components["unet"], ATTRIBUTE)[adapter_name]
        current.copy_(adapter.states[self.name]["value"])

    def remove(self, pipe, adapter_name=None):
        offsets = getattr(pipeline_components(pipe).get("unet"), ATTRIBUTE, {})
        for name in list(offsets):
            if adapter_name is None or name == adapter_name:
                del offsets[name]


@pytest.fixture
def offset_kind(monkeypatch):
    kind = OffsetState()
    monkeypatch.setitem(registry._REGISTRY, kind.name, kind)  # removed again after the test
    return kind


def pipe_with_offset(seed: int = 0):
    pipe = build_tiny_pipeline(seed=0, weights="random")
    torch.manual_seed(seed)
    add_boft_to_pipeline(pipe, {"unet": CONFIG})
    width = pipe.unet.config.block_out_channels[0]
    setattr(pipe.unet, ATTRIBUTE, {"default": torch.arange(width, dtype=torch.float32) + seed})
    return pipe


def test_the_control_kinds_are_registered_and_io_names_none():
    assert [k.name for k in trained_states()][:2] == ["light_control", "controlnet"]
    import boft_diffusion.io.load as load

    assert "control" not in load.__dict__ and "LightControl" not in load.__dict__


def test_a_kind_saves_loads_and_unloads_through_the_door(tmp_path, offset_kind):
    pipe = pipe_with_offset(seed=3)
    path = save_boft_weights(pipe, tmp_path)
    with safe_open(path, framework="pt") as handle:
        assert "state.offset.value" in handle.keys()  # noqa: SIM118
        assert handle.metadata()["offset_width"] == str(pipe.unet.config.block_out_channels[0])
    fresh = build_tiny_pipeline(seed=0, weights="random")
    load_boft_weights(fresh, tmp_path)
    assert torch.equal(getattr(fresh.unet, ATTRIBUTE)["default"], getattr(pipe.unet, ATTRIBUTE)["default"])
    unload_boft(fresh)
    assert getattr(fresh.unet, ATTRIBUTE) == {}
    load_boft_weights(fresh, tmp_path, adapter_name="again")
    delete_boft_adapter(fresh, "again")
    assert getattr(fresh.unet, ATTRIBUTE) == {} and not boft_layers(fresh.unet)


def test_state_no_kind_reads_is_refused_and_the_pipeline_untouched(tmp_path, offset_kind, monkeypatch):
    save_boft_weights(pipe_with_offset(), tmp_path)
    monkeypatch.delitem(registry._REGISTRY, "offset")
    fresh = build_tiny_pipeline(seed=0, weights="random")
    with pytest.raises(
        AdapterFormatError, match=r"holds trained state 'offset' that this version does not read"
    ):
        load_boft_weights(fresh, tmp_path)
    assert not boft_layers(fresh.unet) and not hasattr(fresh.unet, ATTRIBUTE)


def test_a_state_that_does_not_fit_is_refused_before_anything_is_attached(tmp_path, offset_kind):
    pipe = pipe_with_offset()
    getattr(pipe.unet, ATTRIBUTE)["default"] = torch.zeros(3)
    save_boft_weights(pipe, tmp_path)
    fresh = build_tiny_pipeline(seed=0, weights="random")
    with pytest.raises(AdapterFormatError, match=r"offset of shape \(3,\)"):
        load_boft_weights(fresh, tmp_path)
    assert not boft_layers(fresh.unet) and not hasattr(fresh.unet, ATTRIBUTE)


def test_attached_state_is_detached_when_the_adapter_fails_to_go_in(tmp_path, offset_kind, monkeypatch):
    save_boft_weights(pipe_with_offset(), tmp_path)
    fresh = build_tiny_pipeline(seed=0, weights="random")

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("boft_diffusion.io.load.apply_adapter_plans", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_boft_weights(fresh, tmp_path)
    assert getattr(fresh.unet, ATTRIBUTE, {}) == {}


def test_checkpoints_gather_and_restore_the_state_exactly(tmp_path, offset_kind):
    trained = pipe_with_offset(seed=5)
    components = {"unet": trained.unet}
    adapter = full_adapter(components, "default")
    assert torch.equal(adapter.states["offset"]["value"], getattr(trained.unet, ATTRIBUTE)["default"])
    save_boft_weights(trained, tmp_path)
    assert (
        read_adapter(tmp_path).states["offset"]["value"].tolist()
        == adapter.states["offset"]["value"].tolist()
    )

    resumed = pipe_with_offset(seed=0)  # the same layout, other values
    load_adapter_tensors({"unet": resumed.unet}, tmp_path, "default")
    assert torch.equal(
        getattr(resumed.unet, ATTRIBUTE)["default"], getattr(trained.unet, ATTRIBUTE)["default"]
    )


@pytest.mark.parametrize("name", ["", "Offset", "has space", "light_control"])
def test_a_kind_needs_a_fresh_lower_case_name(name):
    kind = OffsetState()
    kind.name = name
    with pytest.raises(ValueError, match="trained-state"):
        register_trained_state(kind)
