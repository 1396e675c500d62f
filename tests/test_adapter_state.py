"""Adapter state in both directions, owned by inject: the plan, the check, and the exact inverse pair
``adapter_state_dict`` / ``load_adapter_state_dict``."""

from __future__ import annotations

import pytest
import torch

from boft_diffusion import BOFTConfig, add_boft
from boft_diffusion.inject import (
    adapter_state_dict,
    boft_layers,
    check_adapter_state_dict,
    load_adapter_state_dict,
    plan_adapter,
    set_enabled,
    stock_state_dict,
)
from boft_diffusion.tiny import build_tiny_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # proj_in: a 1x1 Conv2d
MODELS = {
    "unet": dict(target_modules=UNET_TARGETS, modules_to_save=["conv_out"]),
    "text_encoder": dict(target_modules=None, modules_to_save=["final_layer_norm"]),
}


def config(component: str, bias: str, **extra) -> BOFTConfig:
    return BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, bias=bias, **MODELS[component], **extra)


def fresh(component: str):
    return getattr(build_tiny_pipeline(seed=0), component)


def perturb(state: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Move every trained tensor (generators, scales, biases, modules_to_save copies) off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in state.values():
            tensor.add_(torch.randn(tensor.shape, generator=g).to(tensor.dtype) * 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("component", list(MODELS))
@pytest.mark.parametrize("bias", ["none", "boft_only", "all"])
def test_load_is_the_exact_inverse_of_save(component, bias):
    trained = add_boft(fresh(component), config(component, bias))
    perturb(adapter_state_dict(trained))  # the returned tensors share storage with the parameters
    saved = {k: t.clone() for k, t in adapter_state_dict(trained).items()}
    assert any(k.endswith(".boft_R") for k in saved) and any(
        "conv_out." in k or "final_layer_norm." in k for k in saved
    )
    trained_biases = [
        k for k in saved if k.endswith(".bias") and not k.startswith(("conv_out.", "final_layer_norm."))
    ]
    assert bool(trained_biases) == (bias != "none")

    model = add_boft(fresh(component), config(component, bias))
    load_adapter_state_dict(model, saved)
    back = adapter_state_dict(model)
    assert list(back) == list(saved)
    for key, tensor in saved.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert stock_state_dict(model).keys() == stock_state_dict(trained).keys()
    for key, tensor in stock_state_dict(trained).items():  # same model, bit for bit (biases of "all" too)
        assert torch.equal(stock_state_dict(model)[key], tensor), key


@pytest.mark.parametrize("component", list(MODELS))
@pytest.mark.parametrize("bias", ["none", "boft_only", "all"])
def test_plan_is_what_add_boft_creates_and_touches_nothing(component, bias):
    model = fresh(component)
    modules, state = dict(model.named_modules()), model.state_dict()
    plan = plan_adapter(model, config(component, bias))
    assert dict(model.named_modules()) == modules
    assert all(
        model.state_dict()[k] is not None and torch.equal(model.state_dict()[k], t) for k, t in state.items()
    )

    add_boft(model, config(component, bias))
    expected = {k: tuple(t.shape) for k, t in adapter_state_dict(model).items()}
    assert list(plan.shapes().items()) == list(expected.items())
    layers = boft_layers(model)
    assert set(plan.targets) == set(layers)
    for path, target in plan.targets.items():
        assert layers[path].layouts["default"] == target.layout and type(layers[path]) is target.layer_type


def test_plan_of_a_second_adapter_over_adapted_layers():
    unet = fresh("unet")
    add_boft(unet, BOFTConfig(boft_block_size=8, target_modules=["to_q", "to_k"], bias="boft_only"))
    second = BOFTConfig(
        boft_block_size=0,
        boft_block_num=4,
        target_modules=["to_k", "to_v"],
        bias="all",
        modules_to_save=["conv_out"],
    )
    plan = plan_adapter(unet, second, "second")
    assert plan.other_layers and all(p.endswith("to_q") for p in plan.other_layers)
    add_boft(unet, second, "second")
    assert plan.shapes() == {k: tuple(t.shape) for k, t in adapter_state_dict(unet, "second").items()}
    # The plan of an adapter the model holds describes it as it is.
    assert plan_adapter(unet, second, "second").shapes() == plan.shapes()


@pytest.mark.parametrize(
    ("cfg", "error", "match"),
    [
        (BOFTConfig(boft_block_size=7), ValueError, r"layer '.*to_q' .*not divisible by boft_block_size=7"),
        (
            BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=4),
            ValueError,
            r"layer '.*'.*too large",
        ),
        (BOFTConfig(target_modules=["norm1"]), TypeError, r"layer '.*norm1': BOFT supports nn.Linear"),
        (BOFTConfig(target_modules=["no_such_proj"]), ValueError, "matched no module"),
        (
            BOFTConfig(target_modules=["to_q"], modules_to_save=["attn1"]),
            ValueError,
            "adapted or trained in full",
        ),
    ],
)
def test_plan_raises_what_add_boft_raises_and_changes_nothing(cfg, error, match):
    unet = fresh("unet")
    modules = dict(unet.named_modules())
    with pytest.raises(error, match=match):
        plan_adapter(unet, cfg)
    with pytest.raises(error, match=match):
        add_boft(unet, cfg)
    assert dict(unet.named_modules()) == modules and not boft_layers(unet)


def test_check_names_key_and_shapes():
    unet = fresh("unet")
    plan = plan_adapter(unet, config("unet", "boft_only"))
    good = {k: torch.zeros(s) for k, s in plan.shapes().items()}
    check_adapter_state_dict(plan, good)
    key = next(k for k in good if k.endswith("to_k.boft_s"))
    with pytest.raises(ValueError, match=rf"unet\.{key} has shape \(\d+,\), the model needs \(\d+,\)"):
        check_adapter_state_dict(plan, {**good, key: good[key][:-1]}, prefix="unet.")
    with pytest.raises(ValueError, match="no target module for 'to_z.boft_R'"):
        check_adapter_state_dict(plan, {**good, "to_z.boft_R": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"targets \['.*boft_R'\] have no weights"):
        check_adapter_state_dict(plan, {k: t for k, t in good.items() if k != next(iter(good))})
    bias = next(k for k in good if k.endswith(".bias") and "conv_out" not in k)
    none = plan_adapter(unet, config("unet", "none"))
    with pytest.raises(ValueError, match="trained bias, but the adapter's config has bias='none'"):
        check_adapter_state_dict(none, {k: t for k, t in good.items() if k in none.shapes() or k == bias})


def test_load_checks_everything_before_writing():
    unet = add_boft(fresh("unet"), config("unet", "none"))
    before = {k: t.clone() for k, t in adapter_state_dict(unet).items()}
    state = {k: t + 1 for k, t in before.items()}
    key = next(iter(state))
    for bad, match in [
        ({**state, "nope.boft_R": torch.zeros(1)}, "unexpected keys \\['nope.boft_R'\\]"),
        ({k: t for k, t in state.items() if k != key}, "missing keys"),
        ({**state, key: state[key][:1]}, "the adapter needs"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_adapter_state_dict(unet, bad)
        assert all(torch.equal(adapter_state_dict(unet)[k], t) for k, t in before.items())
    load_adapter_state_dict(unet, {key: state[key]}, strict=False)  # partial, as a file may be
    assert torch.equal(adapter_state_dict(unet)[key], state[key])


def test_stock_state_dict_gives_stock_keys_and_the_copy_in_effect():
    te = fresh("text_encoder")
    stock = {k: t.clone() for k, t in te.state_dict().items()}
    add_boft(te, config("text_encoder", "boft_only", init_weights=False))
    state = stock_state_dict(te)
    assert state.keys() == stock.keys()
    assert all(torch.equal(state[k], t) for k, t in stock.items())  # not merged: the stock tensors
    with torch.no_grad():
        te.get_submodule("final_layer_norm").copies["default"].weight.mul_(2.0)
    assert torch.equal(stock_state_dict(te)["final_layer_norm.weight"], stock["final_layer_norm.weight"] * 2)
    set_enabled(te, False)
    assert torch.equal(stock_state_dict(te)["final_layer_norm.weight"], stock["final_layer_norm.weight"])
