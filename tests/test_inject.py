"""Injection on real diffusers/transformers models: targets, presets, BOFTModel verbs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from boft_diffusion import TEXT_ENCODER_TARGETS, BOFTConfig, BOFTModel, add_boft
from boft_diffusion.inject import adapter_state_dict, boft_layers, find_target_names, remove_boft


def unet_inputs(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 500]), context


def randomise(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in boft_layers(model).values():
            for p in [*layer.boft_R.values(), *layer.boft_s.values()]:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_unet_preset_targets_attention_projections(tiny_pipe):
    unet = tiny_pipe.unet
    processors = dict(unet.attn_processors)
    add_boft(unet, BOFTConfig(boft_block_size=4))
    names = list(boft_layers(unet))
    assert names and all(
        n.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"} or n.endswith("to_out.0") for n in names
    )
    # The attention processors (SDPA here) are the very same objects, and still run.
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {
        k: type(v) for k, v in processors.items()
    }
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    unet(*unet_inputs(unet))


def test_text_encoder_preset_and_layers_to_transform(tiny_pipe):
    te = tiny_pipe.text_encoder
    config = BOFTConfig(boft_block_size=4, layers_to_transform=[1], layers_pattern="layers")
    names = find_target_names(te, config)
    assert names and all(".layers.1." in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(TEXT_ENCODER_TARGETS)


def test_regex_targets(tiny_pipe):
    config = BOFTConfig(boft_block_size=4, target_modules=r".*attn2\.to_(k|v)")
    names = find_target_names(tiny_pipe.unet, config)
    assert names and all("attn2.to_" in n for n in names)


def test_unmatched_target_is_an_error(tiny_pipe):
    with pytest.raises(ValueError, match="matched no module"):
        add_boft(tiny_pipe.unet, BOFTConfig(target_modules=["no_such_proj"]))


def test_failed_injection_leaves_model_unchanged(tiny_pipe):
    unet = tiny_pipe.unet
    modules_before = dict(unet.named_modules())
    with pytest.raises(ValueError, match="not divisible by boft_block_size=7"):
        add_boft(unet, BOFTConfig(boft_block_size=7))
    assert dict(unet.named_modules()) == modules_before
    assert not boft_layers(unet)


def test_unload_after_merge_restores_original_objects(tiny_pipe):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet)
    with torch.no_grad():
        before = unet(*inputs).sample
    originals = dict(unet.named_modules())
    model = BOFTModel(unet, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False))
    model.merge_adapter()
    restored = model.unload()
    assert all(restored.get_submodule(n) is m for n, m in originals.items() if n)
    with torch.no_grad():
        after = restored(*inputs).sample
    torch.testing.assert_close(
        after, before, atol=1e-5, rtol=1e-5
    )  # unmerged back: exact up to fp32 roundoff


def test_detach_without_merge_is_bit_identical(tiny_pipe):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet)
    with torch.no_grad():
        before = unet(*inputs).sample
    add_boft(unet, BOFTConfig(boft_block_size=4, init_weights=False))
    remove_boft(unet)
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, before)


def test_merged_unet_and_text_encoder_equal_unmerged(tiny_pipe):
    for module, inputs in [
        (tiny_pipe.unet, unet_inputs(tiny_pipe.unet)),
        (tiny_pipe.text_encoder, (torch.tensor([[0, 5, 9, 13, 913]]),)),
    ]:
        model = BOFTModel(
            module, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)
        )
        with torch.no_grad():
            unmerged = model(*inputs)[0]
            merged_model = model.merge_and_unload(safe_merge=True)
            merged = merged_model(*inputs)[0]
        assert not boft_layers(merged_model)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_trainable_parameters_are_exactly_the_adapter(tiny_pipe, capsys):
    unet = tiny_pipe.unet
    model = BOFTModel(unet, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2))
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("boft_R.default", "boft_s.default")) for n in trainable)
    # True count: b(b-1)/2 free generator entries per block, plus the scales.
    expected = sum(
        layer.layouts["default"].n_factors * layer.layouts["default"].block_num * 6 + layer.out_features
        for layer in boft_layers(unet).values()
    )
    assert model.get_nb_trainable_parameters()[0] == expected
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,d}" in capsys.readouterr().out


@pytest.mark.parametrize("bias", ["none", "boft_only", "all"])
def test_bias_modes(tiny_pipe, bias):
    te = tiny_pipe.text_encoder
    add_boft(te, BOFTConfig(boft_block_size=4, bias=bias))
    biases = {n for n, p in te.named_parameters() if p.requires_grad and "bias" in n}
    state = adapter_state_dict(te)
    assert not any(p.requires_grad for n, p in te.named_parameters() if ".base_layer." in n)
    if bias == "none":
        assert not biases and not any(k.endswith(".bias") for k in state)
    elif bias == "boft_only":  # the adapter's own bias copies, saved under the stock key <path>.bias
        assert biases and all(n.endswith(".boft_bias.default") for n in biases)
        assert {k for k in state if k.endswith(".bias")} == {
            n.replace(".boft_bias.default", ".bias") for n in biases
        }
    else:
        assert any("mlp" in n for n in biases)
        assert any(n.endswith(".boft_bias.default") for n in biases)


def test_modules_to_save_and_delete_adapter(tiny_pipe):
    te = tiny_pipe.text_encoder
    ids = torch.tensor([[0, 5, 9, 913]])
    with torch.no_grad():
        before = te(ids)[0]
    model = BOFTModel(te, BOFTConfig(boft_block_size=4, modules_to_save=["final_layer_norm"]))
    wrapper = te.get_submodule("final_layer_norm")
    assert wrapper.copies["default"].weight.requires_grad
    with torch.no_grad():
        wrapper.copies["default"].weight.mul_(2.0)
    assert "final_layer_norm.weight" in adapter_state_dict(te)
    with torch.no_grad():
        changed = te(ids)[0]
        assert not torch.allclose(changed, before)
        with model.disable_adapter():
            torch.testing.assert_close(te(ids)[0], before)
    model.delete_adapter("default")
    assert not boft_layers(te)
    with torch.no_grad():
        torch.testing.assert_close(te(ids)[0], before)


def test_several_adapters_set_and_delete(tiny_pipe):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base = unet(*inputs).sample
    model = BOFTModel(unet, BOFTConfig(boft_block_size=4, init_weights=False))
    model.add_adapter("other", BOFTConfig(boft_block_size=8, target_modules=["to_q"], init_weights=False))
    assert model.active_adapter == "default"
    with torch.no_grad():
        first = unet(*inputs).sample
        model.set_adapter("other")
        assert [n for n, p in unet.named_parameters() if p.requires_grad][0].endswith("boft_R.other")
        second = unet(*inputs).sample
    assert not torch.allclose(first, second) and not torch.allclose(first, base)
    model.delete_adapter("other")
    model.delete_adapter("default")
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, base)


def test_safe_merge_refuses_broken_adapter(tiny_pipe):
    unet = tiny_pipe.unet
    weights = copy.deepcopy(unet.state_dict())
    model = BOFTModel(unet, BOFTConfig(boft_block_size=4))
    layer = next(iter(boft_layers(unet).values()))
    with torch.no_grad():
        layer.boft_s["default"][0] = float("nan")
    with pytest.raises(ValueError, match="adapter.*default.*broken"):
        model.merge_and_unload(safe_merge=True)
    assert not layer.merged
    model.unload()
    for k, v in unet.state_dict().items():
        assert torch.equal(v, weights[k])


def test_gradient_checkpointing_and_backward_through_unet(tiny_pipe):
    unet = tiny_pipe.unet
    unet.enable_gradient_checkpointing()
    unet.train()
    add_boft(unet, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.1))
    unet(*unet_inputs(unet)).sample.square().mean().backward()
    grads = [layer.boft_R["default"].grad for layer in boft_layers(unet).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_custom_attention_processor_keeps_working(tiny_pipe):
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_pipe.unet
    add_boft(unet, BOFTConfig(boft_block_size=4, init_weights=False))
    inputs = unet_inputs(unet)
    with torch.no_grad():
        sdpa = unet(*inputs).sample
        unet.set_attn_processor(AttnProcessor())  # the classic (non-SDPA) processor, set after BOFT
        classic = unet(*inputs).sample
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())
    torch.testing.assert_close(classic, sdpa, atol=1e-5, rtol=1e-4)


def test_controlnet_and_projection_text_encoder(tiny_pipe):
    from transformers import CLIPTextModelWithProjection

    from boft_diffusion.tiny import build_tiny_controlnet

    controlnet = build_tiny_controlnet(tiny_pipe.unet)
    add_boft(controlnet, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2))
    assert boft_layers(controlnet)
    te2 = CLIPTextModelWithProjection(tiny_pipe.text_encoder.config)
    model = BOFTModel(te2, BOFTConfig(boft_block_size=4, init_weights=False))
    out = model(torch.tensor([[0, 5, 913]])).text_embeds
    assert out.shape == (1, te2.config.projection_dim) and torch.isfinite(out).all()
