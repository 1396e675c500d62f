"""Layers: equivalence with PEFT's BOFT and with dense references, dtypes, merge, composition."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from boft_diffusion import BOFTConfig, BOFTModel
from boft_diffusion.functional import dense_rotation, factor_permutations, pack_skew
from boft_diffusion.inject import boft_layers

torch.manual_seed(0)


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial generators and scales on every adapter of ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in boft_layers(model).values():
            for name in layer.boft_R:
                layer.boft_R[name].copy_(torch.randn(layer.boft_R[name].shape, generator=g) * 0.3)
                layer.boft_s[name].copy_(1 + 0.1 * torch.randn(layer.boft_s[name].shape, generator=g))


def reference_weight(layer, name: str = "default") -> torch.Tensor:
    """Dense reference of the adapted weight rows: ``(M W^T)^T ⊙ s``, M from the paper's definition."""
    blocks, _, scale = layer.rotation(name)
    layout = layer.layouts[name]
    m = dense_rotation(
        blocks.double(),
        factor_permutations(layout.dim, layout.block_num, layout.block_size, layout.n_factors),
    )
    return (m @ layer.weight_rows().double().T).T * scale.double()[:, None]


def peft_model(base: nn.Module, **kwargs):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that its CUDA extension is missing on CPU
        return peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(init_weights=False, **kwargs))


def copy_from_peft(ours: nn.Module, theirs) -> None:
    with torch.no_grad():
        for name, layer in boft_layers(ours).items():
            other = theirs.base_model.model.get_submodule(name)
            layer.boft_R["default"].copy_(pack_skew(other.boft_R["default"]))
            layer.boft_s["default"].copy_(other.boft_s["default"].flatten())


@pytest.mark.parametrize("tokens", [3, 200])  # input-rotation path and weight-rotation path
def test_linear_matches_peft(tokens):
    base = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16, bias=False))
    theirs = peft_model(base, boft_block_size=4, target_modules=["0", "2"], bias="boft_only")
    ours = BOFTModel(
        copy.deepcopy(base), BOFTConfig(boft_block_size=4, target_modules=["0", "2"], bias="boft_only")
    )
    copy_from_peft(ours.model, theirs)
    x = torch.randn(tokens, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-6, rtol=1e-5)


def test_conv2d_matches_peft():
    base = nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1))
    theirs = peft_model(base, boft_block_size=0, boft_block_num=2, target_modules=["0", "2"])
    ours = BOFTModel(
        copy.deepcopy(base), BOFTConfig(boft_block_size=0, boft_block_num=2, target_modules=["0", "2"])
    )
    copy_from_peft(ours.model, theirs)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(("b", "m"), [(4, 2), (4, 3), (2, 4), (8, 2)])
def test_butterfly_factors_match_dense_reference_with_peft_permutations(b, m):
    """PEFT runs m > 1 only with its CUDA extension: compare with a dense reference on PEFT's perm function."""
    layer_mod = pytest.importorskip("peft.tuners.boft.layer")
    d = 64
    base = nn.Linear(d, 24)
    model = BOFTModel(
        nn.Sequential(base), BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m, target_modules=["0"])
    )
    randomise(model)
    layer = boft_layers(model.model)["0"]
    blocks, _, scale = layer.rotation("default")
    r = d // b
    rotation = torch.eye(d, dtype=torch.float64)
    for i in range(m):  # PEFT's get_delta_weight with dense permutation matrices
        perm = layer_mod.BOFTLayer.block_butterfly_perm(None, d, r // 2**i, b // 2, m - 1)
        p = torch.zeros(d, d, dtype=torch.float64)
        p[torch.arange(d), perm] = 1
        rotation = p @ torch.block_diag(*blocks[i].double()) @ p.T @ rotation
    x = torch.randn(100, d, dtype=torch.float64)
    expected = (F.linear(x @ rotation, base.weight.double()) * scale.double()) + base.bias.double()
    torch.testing.assert_close(model(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_input_path_equals_weight_path():
    model = BOFTModel(
        nn.Sequential(nn.Linear(32, 40)),
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["0"]),
    )
    randomise(model)
    x = torch.randn(100, 32)
    weight_path = model(x)
    input_path = torch.cat([model(row[None]) for row in x[:5]])
    torch.testing.assert_close(input_path, weight_path[:5], atol=1e-5, rtol=1e-5)


def test_conv1d_fan_in_fan_out_matches_linear():
    conv1d_cls = pytest.importorskip("transformers.pytorch_utils").Conv1D
    linear = nn.Linear(16, 12)
    conv1d = conv1d_cls(12, 16)
    with torch.no_grad():
        conv1d.weight.copy_(linear.weight.T)
        conv1d.bias.copy_(linear.bias)
    config = dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["0"], init_weights=False)
    torch.manual_seed(3)
    a = BOFTModel(nn.Sequential(linear), BOFTConfig(**config))
    torch.manual_seed(3)
    b = BOFTModel(nn.Sequential(conv1d), BOFTConfig(fan_in_fan_out=True, **config))
    x = torch.randn(30, 16)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    merged = b.merge_and_unload()
    torch.testing.assert_close(merged(x), a(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(4, 8, (1, 3), stride=2, padding=(0, 2), dilation=2),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    ],
    ids=["3x3", "strided-dilated-rect", "grouped", "reflect"],
)
def test_conv2d_any_geometry_matches_dense_reference(conv):
    config = BOFTConfig(
        boft_block_size=6, boft_n_butterfly_factor=2, target_modules=["0"], init_weights=False
    )
    model = BOFTModel(nn.Sequential(conv), config)
    layer = boft_layers(model.model)["0"]
    x = torch.randn(2, conv.in_channels, 10, 10)
    expected = conv._conv_forward(
        x.double(), reference_weight(layer).reshape(conv.weight.shape), conv.bias.double()
    )
    torch.testing.assert_close(model(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_zero_init_leaves_outputs_identical():
    base = nn.Sequential(nn.Linear(16, 16), nn.Conv2d(1, 4, 4))
    x = torch.randn(3, 16)
    before = base[0](x)
    model = BOFTModel(
        base, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["0", "1"])
    )
    torch.testing.assert_close(model.model[0](x), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_forward_backward(dtype):
    base = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Conv2d(2, 4, 3, padding=1)).to(dtype)
    model = BOFTModel(
        base,
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["0"], init_weights=False),
    )
    layer = boft_layers(model.model)["0"]
    assert layer.boft_R["default"].dtype == torch.float32 and layer.base_layer.weight.dtype == dtype
    for tokens in (4, 64):
        x = torch.randn(tokens, 32, dtype=dtype)
        out = model.model[0](x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        out.float().square().mean().backward()
        assert (
            torch.isfinite(layer.boft_R["default"].grad).all()
            and layer.boft_R["default"].grad.abs().sum() > 0
        )
        layer.boft_R["default"].grad = None


def test_merge_unmerge_round_trip_and_double_merge():
    base = nn.Sequential(nn.Linear(64, 48), nn.Conv2d(16, 8, 3))
    original = copy.deepcopy(base.state_dict())
    model = BOFTModel(
        base,
        BOFTConfig(
            boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["0", "1"], init_weights=False
        ),
    )
    x = torch.randn(10, 64)
    unmerged = model.model[0](x)
    model.merge_adapter()
    merged_weight = model.model[0].base_layer.weight.clone()
    torch.testing.assert_close(model.model[0](x), unmerged, atol=1e-5, rtol=1e-5)
    model.merge_adapter()  # merging twice is a no-op
    assert torch.equal(model.model[0].base_layer.weight, merged_weight)
    model.unmerge_adapter()
    for key, value in original.items():
        now = model.model.state_dict()[
            key.replace("weight", "base_layer.weight").replace("bias", "base_layer.bias")
        ]
        assert ((now - value).norm() / value.norm()).item() < 1e-6


def test_two_adapters_compose_by_multiplying_rotations():
    base = nn.Linear(16, 8)
    model = BOFTModel(
        nn.Sequential(base), BOFTConfig(boft_block_size=4, target_modules=["0"], init_weights=False)
    )
    model.add_adapter(
        "second",
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["0"], init_weights=False),
    )
    model.set_adapter(["default", "second"])
    layer = boft_layers(model.model)["0"]
    m1 = dense_rotation(layer.rotation("default")[0], factor_permutations(16, 4, 4, 1))
    m2 = dense_rotation(layer.rotation("second")[0], factor_permutations(16, 4, 4, 2))
    s = layer.boft_s["default"] * layer.boft_s["second"]
    x = torch.randn(20, 16)
    expected = F.linear(x @ m2 @ m1, base.weight) * s + base.bias
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    model = BOFTModel(
        nn.Sequential(nn.Linear(32, 32)),
        BOFTConfig(boft_block_size=4, boft_dropout=0.5, target_modules=["0"], init_weights=False),
    )
    x = torch.randn(40, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    outputs = {tuple(model(x)[0, :4].tolist()) for _ in range(8)}
    assert len(outputs) > 1


# --- the inference rotation cache -------------------------------------------------------------
def _sampling_model(dropout: float = 0.0) -> BOFTModel:
    model = BOFTModel(
        nn.Sequential(nn.Linear(32, 48), nn.Conv2d(16, 8, 3, padding=1)),
        BOFTConfig(
            boft_block_size=4, boft_n_butterfly_factor=3, boft_dropout=dropout, target_modules=["0", "1"]
        ),
    )
    randomise(model)
    return model.eval()


def _outputs(model: BOFTModel) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, few, image = (
        torch.randn(100, 32, generator=g),
        torch.randn(3, 32, generator=g),
        torch.randn(1, 16, 6, 6, generator=g),
    )
    return [model.model[0](x), model.model[0](few), model.model[1](image)]  # weight path, input path, conv


@pytest.fixture
def cayley_calls(monkeypatch):
    """How many times the layers build Cayley blocks."""
    from boft_diffusion import layers

    calls = []
    original = layers.block_rotations
    monkeypatch.setattr(layers, "block_rotations", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_sampling_reuses_rotations_and_matches_the_uncached_path(cayley_calls):
    model = _sampling_model()
    uncached = _outputs(model)  # gradients on: built per call
    assert not any(layer._rotation_cache for layer in boft_layers(model).values())
    with torch.no_grad():
        first = _outputs(model)
        built = len(cayley_calls)
        second = _outputs(model)
    assert len(cayley_calls) == built, "the second sampling pass rebuilt its rotations"
    for a, b, c in zip(uncached, first, second):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        assert torch.equal(b, c)


def _step(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.train()
    sum(o.square().sum() for o in _outputs(model)).backward()
    optimizer.step()
    model.eval()


def _copy(model):
    with torch.no_grad():
        for layer in boft_layers(model).values():
            layer.boft_R["default"].copy_(torch.randn_like(layer.boft_R["default"]) * 0.3)


def _load(model):
    other = _sampling_model()
    randomise(other, seed=5)
    model.load_state_dict(other.state_dict())


def _replace(model):
    for layer in boft_layers(model).values():
        shape = layer.boft_R["default"].shape
        del layer.boft_R["default"]
        layer.boft_R["default"] = nn.Parameter(torch.randn(shape) * 0.3)


def _strength(model):
    for layer in boft_layers(model).values():
        layer.set_active(["default"], {"default": 0.5})


@pytest.mark.parametrize("change", [_step, _copy, _load, _replace, _strength])
def test_sampling_sees_every_change_to_the_adapter(change):
    model = _sampling_model()
    with torch.no_grad():
        before = _outputs(model)
    change(model)
    with torch.no_grad():
        after = _outputs(model)
    expected = _outputs(model)  # uncached
    for old, new, ref in zip(before, after, expected):
        assert not torch.allclose(old, new)
        torch.testing.assert_close(new, ref, atol=1e-6, rtol=1e-5)


def test_sampling_after_a_dtype_change_and_after_delete(cayley_calls):
    model = _sampling_model()
    with torch.no_grad():
        _outputs(model)
    model.double()  # new storage: the rotations are rebuilt
    built = len(cayley_calls)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        sampled = model.model[0](x)
    assert len(cayley_calls) > built
    # The Cayley blocks are float32 either way; cached, they are collapsed in float32 too.
    torch.testing.assert_close(sampled, model.model[0](x), atol=1e-6, rtol=1e-5)
    model.delete_adapter("default")
    assert not any(layer._rotation_cache for layer in boft_layers(model).values())


def test_the_cache_can_be_switched_off(cayley_calls):
    from boft_diffusion.inject import set_rotation_cache

    model = _sampling_model()
    with torch.no_grad():
        cached = _outputs(model)
        set_rotation_cache(model, False)
        assert not any(layer._rotation_cache for layer in boft_layers(model).values())
        built = len(cayley_calls)
        uncached = _outputs(model)
        rebuilt = len(cayley_calls)
        _outputs(model)
    assert built < rebuilt < len(cayley_calls), "with the cache off every sampling pass rebuilds"
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_training_and_dropout_never_use_the_cache(cayley_calls):
    model = _sampling_model(dropout=0.5)
    with torch.no_grad():
        _outputs(model)
        model.train()
        built = len(cayley_calls)
        _outputs(model)
    assert len(cayley_calls) > built, "dropout in training mode must draw fresh rotations"
    sum(out.sum() for out in _outputs(model)).backward()
    assert all(layer.boft_R["default"].grad is not None for layer in boft_layers(model).values())
