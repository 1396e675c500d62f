"""The family contract: every family in ``FAMILIES`` walked through every hook on its own tiny pipeline.

A new family that passes this file is wired into everything that asks the family: ``family_of``, the
default targets, prompt encoding and per-batch conditioning, latents and the denoiser call, the tiny build
(``model.tiny_family``), the single-file export, ControlNet sampling and the optional sampling arguments.
The family-specific checks against each stock pipeline's own computations are in test_families.py and
test_flux2.py; the single-file layouts against diffusers' converters in test_export*.py.
"""

from __future__ import annotations

import inspect
import re

import diffusers
import pytest
import torch
from torch import nn

from boft_diffusion.config import BOFTConfig
from boft_diffusion.control import controlnet_pipeline
from boft_diffusion.export import export_merged
from boft_diffusion.families import FAMILIES, Family, family_of
from boft_diffusion.inject import find_target_names
from boft_diffusion.sampling import OPTIONAL_ARGUMENTS, accepts
from boft_diffusion.tiny import build_tiny_controlnet

PROMPTS = ["a photo of sks toy", "a red circle on a blue background"]
SIZE = 64


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def pipe(family):
    """The family's tiny pipeline, as ``model.tiny_family`` builds it (its default weights)."""
    return family.tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def conditioning(family, pipe):
    """The batch (token ids and images) and the conditioning of :data:`PROMPTS`."""
    batch = {**family.tokenize(pipe, PROMPTS), "pixel_values": torch.zeros(len(PROMPTS), 3, SIZE, SIZE)}
    encoders = {name: getattr(pipe, name) for name in family.text_encoders}
    with torch.no_grad():
        return batch, family.encode_prompt(encoders, batch, "cpu")


def test_the_tiny_build_is_of_its_family_and_of_no_other(family, pipe):
    assert type(pipe).__name__ == family.pipeline_classes[0]  # the class that samples and validates
    assert family_of(pipe) is family
    bare = {name: getattr(pipe, name) for name in family.components}  # a component mapping, too
    assert family_of(bare) is family
    assert not [other.name for other in FAMILIES.values() if other is not family and other.matches(pipe)]
    assert not [other.name for other in FAMILIES.values() if other is not family and other.matches(bare)]


def test_its_weights_are_the_ones_it_names(family):
    assert family.tiny_weights and set(family.tiny_weights) <= {"world", "random"}
    if "world" not in family.tiny_weights:
        with pytest.raises(ValueError, match=f"tiny {family.name} pipeline has random weights, not 'world'"):
            family.tiny_pipeline(weights="world")
    for weights in family.tiny_weights[1:]:  # the default is the pipe fixture
        assert family_of(family.tiny_pipeline(seed=1, weights=weights)) is family


def test_components_and_default_targets_exist_on_the_pipeline(family, pipe):
    assert family.components[0] == family.denoiser
    assert set(family.trained_text_encoders) <= set(family.text_encoders)
    for name in family.components:
        assert isinstance(getattr(pipe, name), nn.Module), name
    for name, tokenizer in family.tokenizers(pipe).items():
        assert tokenizer is not None, name
    assert set(family.default_targets) <= set(family.components)
    assert family.denoiser in family.default_targets
    for name, targets in family.default_targets.items():
        module = getattr(pipe, name)
        found = find_target_names(module, BOFTConfig(target_modules=list(targets)))
        assert all(isinstance(module.get_submodule(n), nn.Linear | nn.Conv2d) for n in found), name
        names = [n for n, _ in module.named_modules()]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        # only targets naming a block by number may be absent (FLUX.2's single blocks, up to the largest model)
        assert all(any(part.isdigit() for part in t.split(".")) for t in unmatched), (name, unmatched)


def test_tokenize_and_encode_give_one_conditioning_per_prompt(family, conditioning):
    batch, cond = conditioning
    for name in family.text_encoders:
        ids = batch[family.token_key(name)]
        assert ids.ndim == 2 and ids.shape[0] == len(PROMPTS) and ids.dtype == torch.long
    states = cond["encoder_hidden_states"]
    assert states.ndim == 3 and states.shape[0] == len(PROMPTS) and torch.isfinite(states).all()


def test_per_batch_conditioning_is_made_again_from_the_batch(family, conditioning):
    batch, cond = conditioning

    def without(tree: dict, dotted: str) -> dict:
        head, _, rest = dotted.partition(".")
        return {
            k: (without(v, rest) if rest and k == head else v) for k, v in tree.items() if rest or k != head
        }

    def get(tree: dict, dotted: str):
        for part in dotted.split("."):
            tree = tree[part]
        return tree

    cached = cond
    for key in family.per_batch_conditioning:
        get(cond, key)  # present in the full conditioning
        cached = without(cached, key)
    remade = family.add_batch_conditioning(cached, batch, "cpu")
    for key in family.per_batch_conditioning:
        torch.testing.assert_close(get(remade, key), get(cond, key), rtol=0, atol=0)
    assert remade.keys() == cond.keys()


def test_the_denoiser_predicts_the_shape_of_its_latents(family, pipe, conditioning):
    batch, cond = conditioning
    with torch.no_grad():
        latents = family.encode_latents(pipe.vae, batch["pixel_values"])
        assert latents.shape[0] == len(PROMPTS) and latents.ndim == 4
        dtype = torch.float32 if family.objective == "flow" else torch.long
        timesteps = torch.tensor([10, 500], dtype=dtype)
        pred = family.denoise(getattr(pipe, family.denoiser), torch.randn_like(latents), timesteps, cond)
    assert pred.shape == latents.shape and torch.isfinite(pred).all()


def test_the_single_file_layout_maps_every_tensor(family, pipe, tmp_path):
    layout = family.single_file
    if layout is None:  # no original layout: the single-file export refuses it, naming those it writes
        with pytest.raises(ValueError, match=r"single_file export writes .*checkpoints"):
            export_merged(pipe, tmp_path / "model.safetensors", format="single_file")
        assert not (tmp_path / "model.safetensors").exists()
        return
    assert set(layout.held) <= set(layout.components) and "vae" in layout.components
    assert set(layout.components) - {"vae"} <= set(family.components)
    modules = {name: getattr(pipe, name) for name in layout.held}
    states = {name: module.state_dict() for name, module in modules.items()}
    original = layout.to_original(states, {name: module.config for name, module in modules.items()})
    numel = sum(
        t.numel() for state in states.values() for k, t in state.items() if not k.endswith("position_ids")
    )
    assert sum(t.numel() for t in original.values()) == numel  # every number placed once, none invented
    states[family.denoiser]["no.such.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"no\.such\.weight"):  # a denoiser key with no place is named
        layout.to_original(states, {name: module.config for name, module in modules.items()})


def test_the_controlnet_pipeline_is_stock_and_built_from_the_pipelines_modules(family, pipe):
    kind = family.controlnet_pipeline_class()
    if kind is None:
        with pytest.raises(
            ValueError, match=f"ControlNet sampling supports .* not {re.escape(family.title)}"
        ):
            controlnet_pipeline(pipe, nn.Identity())
        return
    assert kind is getattr(diffusers, family.controlnet_pipeline)
    wrapped = controlnet_pipeline(pipe, build_tiny_controlnet(pipe))
    assert isinstance(wrapped, kind) and getattr(wrapped, family.denoiser) is getattr(pipe, family.denoiser)
    assert family_of(wrapped) is family


def test_pipeline_options_and_call_arguments_are_the_stock_classes(family):
    classes = [getattr(diffusers, name) for name in family.pipeline_classes]
    if family.controlnet_pipeline is not None:
        classes.append(family.controlnet_pipeline_class())
    assert set(family.call_arguments) <= set(OPTIONAL_ARGUMENTS)
    for cls in classes:
        init = inspect.signature(cls.__init__).parameters
        assert set(family.pipeline_options) <= set(init), cls.__name__
        for name in OPTIONAL_ARGUMENTS:
            assert accepts(cls, name) == (name in family.call_arguments), (cls.__name__, name)
