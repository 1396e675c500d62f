"""BOFT over a quantized base (model.quantization): the rotation in front of a bitsandbytes, torchao or
optimum-quanto layer equals the same adapter on the layer's dequantized weights; merging in place is refused
unless requantized (8-bit; 4-bit never); a quantized base trains, exports at full precision, and its adapter
loads into the full-precision base and the reverse.

Every backend runs here on the CPU at the layer level (bitsandbytes >= 0.45 has CPU kernels). Through the
loaders, torchao and quanto run on the CPU; diffusers' bitsandbytes loader needs a GPU and is refused here
with one line (scripts/gpu_benchmark.py exercises it on a GPU).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import DREAMBOOTH_FAST, recipe_config
from torch import nn

from boft_diffusion import BOFTConfig, load_boft_weights
from boft_diffusion.inject import add_boft, merge_adapters
from boft_diffusion.layers import BOFTLinear
from boft_diffusion.pipeline import base_fingerprint, merge_boft, same_base, unmerge_boft
from boft_diffusion.quantized import QuantizedMergeError, dequantized_weight, quantization_of, quantize_linear
from boft_diffusion.training.args import ConfigError, ModelArgs, QuantizationArgs

BACKENDS = ["bnb-nf4", "bnb-int8", "torchao-int8", "torchao-fp8", "quanto-int8", "quanto-fp8"]
LOADABLE_ON_CPU = ["torchao-int8", "torchao-fp8", "quanto-int8", "quanto-fp8"]
# bitsandbytes' CPU int8 layer also rounds its input to int8 (LLM.int8 without outliers): looser.
TOLERANCE = {"bnb-int8": 3e-2}


def quantize(linear: nn.Linear, backend: str) -> nn.Module:
    """A copy of ``linear`` quantized by ``backend`` in memory, as each library's loader leaves it."""
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    plain.load_state_dict(linear.state_dict())
    return quantize_linear(plain, backend)


def adapted_pair(
    backend: str, bias: str = "boft_only", dropout: float = 0.0
) -> tuple[BOFTLinear, BOFTLinear]:
    """The same trained-looking adapter over a quantized layer and over a plain layer holding its
    dequantized weight (the reference)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    quantized = quantize(linear, backend)
    reference = nn.Linear(64, 48)
    with torch.no_grad():
        reference.weight.copy_(dequantized_weight(quantized).float())
        reference.bias.copy_(quantized.bias.float())
    reference.requires_grad_(False)
    config = BOFTConfig(
        boft_block_size=8, boft_n_butterfly_factor=2, bias=bias, init_weights=False, boft_dropout=dropout
    )
    pair = []
    for base in (quantized, reference):
        torch.manual_seed(1)
        layer = BOFTLinear(base)
        layer.add_adapter("a", config)
        if bias != "none":
            with torch.no_grad():
                layer.boft_bias["a"].add_(0.1)
        pair.append(layer)
    return pair[0], pair[1]


def close(a: torch.Tensor, b: torch.Tensor, backend: str) -> None:
    tol = TOLERANCE.get(backend, 1e-4)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_rotation_in_front_of_a_quantized_layer_equals_it_on_the_dequantized_weights(backend):
    layer, reference = adapted_pair(backend)
    assert layer.quantization == backend and reference.quantization is None
    base_type = type(layer.base_layer)
    x = torch.randn(2, 40, 64)  # 80 tokens > 48 outputs: a plain layer would rotate the weight instead
    out, expected = layer(x), reference(x)
    close(out, expected, backend)
    out.square().mean().backward()
    expected.square().mean().backward()
    for name in ("boft_R", "boft_s", "boft_bias"):
        got, want = getattr(layer, name)["a"].grad, getattr(reference, name)["a"].grad
        tol = TOLERANCE.get(backend, 1e-3)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    assert type(layer.base_layer) is base_type  # called as it is: never replaced or written
    torch.testing.assert_close(layer.merged_weight(), reference.merged_weight(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torchao-int8", "quanto-int8"])
def test_the_recomputed_training_call_draws_the_same_dropout_and_keeps_only_its_input(backend):
    layer, reference = adapted_pair(backend, dropout=0.5)
    layer.train(), reference.train()
    x = torch.randn(2, 40, 64, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    expected = reference(x)
    close(out, expected, backend)  # the same blocks dropped
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    # Kept for the backward pass: the input and the layer's own parameters, nothing computed (the rotation,
    # the quantized call and the scale are recomputed there).
    params = {id(p) for p in layer.parameters()}
    assert any(t is x for t in saved) and all(t is x or id(t) in params for t in saved)
    torch.manual_seed(7)
    layer(x).square().mean().backward()
    torch.manual_seed(7)
    reference(x).square().mean().backward()
    got, want = layer.boft_R["a"].grad, reference.boft_R["a"].grad
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_merging_into_a_quantized_base_is_refused_unless_requantized(backend):
    layer, reference = adapted_pair(backend)
    original = layer.base_layer
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = layer(x)
    with pytest.raises(QuantizedMergeError, match="quantized base"):
        layer.merge()
    with pytest.raises(QuantizedMergeError, match=r"layer 'proj'.*requantize=True"):
        merge_adapters(_holder(layer))
    assert layer.base_layer is original and not layer.merged
    if "4" in backend:
        with pytest.raises(QuantizedMergeError, match="4-bit"):
            layer.merge(requantize=True)
        assert layer.base_layer is original and not layer.merged
        return
    with pytest.warns(UserWarning, match=r"requantized .*relative weight error"):
        merge_adapters(_holder(layer), requantize=True)
    assert layer.merged and layer.base_layer is not original and quantization_of(layer.base_layer) == backend
    with torch.no_grad():
        close(layer(x), before, "bnb-int8")  # one more rounding of the weight: loose
    layer.unmerge()
    assert layer.base_layer is original and not layer.merged  # the quantized layer itself, bit for bit
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before)


class _Holder(nn.Module):
    def __init__(self, layer: BOFTLinear) -> None:
        super().__init__()
        self.proj = layer


def _holder(layer: BOFTLinear) -> nn.Module:
    return _Holder(layer)


def test_a_missing_library_or_device_is_one_line_before_loading(monkeypatch):
    from boft_diffusion.training import quantize as q

    with pytest.raises(ConfigError, match="diffusers' bitsandbytes loader needs a CUDA or XPU device"):
        monkeypatch.setattr(q, "_gpu_for_bnb", lambda: False)
        q.check_quantization(QuantizationArgs("bnb-nf4"))
    real = importlib.util.find_spec
    monkeypatch.setattr(q.importlib.util, "find_spec", lambda name: None if "quanto" in name else real(name))
    with pytest.raises(
        ConfigError, match="needs optimum-quanto, which is not installed: pip install optimum-quanto"
    ):
        q.check_quantization(QuantizationArgs("quanto-int8"))


def test_bad_quantization_keys_are_refused():
    with pytest.raises(ConfigError, match="model.quantization.components must be a list of denoiser"):
        QuantizationArgs("torchao-int8", ["unet"])
    with pytest.raises(ConfigError, match="which Stable Diffusion .* does not have"):
        from boft_diffusion.training.setup import load_pipeline

        load_pipeline(ModelArgs(quantization=QuantizationArgs("torchao-int8", ["text_encoder_3"])))


def _loaded(backend: str, components=("denoiser",)):
    from boft_diffusion.training.setup import load_pipeline

    return load_pipeline(ModelArgs(quantization=QuantizationArgs(backend, list(components))))


def test_a_quantized_base_keeps_the_fingerprint_of_its_non_linear_weights():
    from boft_diffusion.training.setup import load_pipeline

    full = load_pipeline(ModelArgs())
    quantized = _loaded("quanto-int8", ["denoiser", "text_encoder"])
    assert quantization_of(quantized.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q)
    fingerprint = base_fingerprint(quantized)
    assert fingerprint.startswith("sha256-nolinear:")
    assert fingerprint == base_fingerprint(full, linear_weights=False) != base_fingerprint(full)
    assert same_base(full, fingerprint) == (True, fingerprint)  # eval and convert --to lora accept the base
    other = load_pipeline(ModelArgs(tiny_weights="random"))
    assert not same_base(other, fingerprint)[0]


def _denoise(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), context).sample


@pytest.mark.slow
@pytest.mark.parametrize("backend", LOADABLE_ON_CPU)
def test_a_quantized_base_trains_exports_and_its_adapter_loads_into_the_full_precision_base(
    tmp_path, backend
):
    from diffusers import StableDiffusionPipeline

    from boft_diffusion.export import export_merged
    from boft_diffusion.recipes.dreambooth import DreamBoothConfig, run
    from boft_diffusion.training.setup import load_pipeline

    out = tmp_path / "run"
    overrides = [
        f"model.quantization.backend={backend}",
        "model.quantization.components=[denoiser,text_encoder]",
    ]
    run(recipe_config(DreamBoothConfig, out, *DREAMBOOTH_FAST, "optim.learning_rate=5e-2", *overrides))

    quantized = _loaded(backend, ["denoiser", "text_encoder"])
    load_boft_weights(quantized, out)  # trained on a quantized base, into a quantized base
    full = load_pipeline(ModelArgs())
    base = _denoise(full)
    load_boft_weights(full, out)  # ... and into the full-precision base (the fingerprint check passes)
    on_quantized, on_full = _denoise(quantized), _denoise(full)
    assert (on_full - base).abs().max() > 1e-3  # it trained something
    # The adapter on the full-precision base does what it does on the quantized one, up to the base's rounding.
    error = (on_quantized - on_full).abs().max() / on_full.abs().max()
    assert error < (0.05 if "fp8" in backend else 0.02)

    # Merging in place is refused; the export is written at full precision and stock diffusers opens it.
    with pytest.raises(QuantizedMergeError, match="requantize=True"):
        merge_boft(quantized)
    export_merged(quantized, tmp_path / "merged")
    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert quantization_of(stock.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q) is None
    torch.testing.assert_close(
        _denoise(stock), on_quantized, rtol=1e-3, atol=1e-3 * float(on_quantized.abs().max())
    )

    # On request the merge requantizes (8-bit) and says what it cost; unmerging gives the quantized base back.
    with pytest.warns(UserWarning, match="relative weight error"):
        merge_boft(quantized, requantize=True)
    merged = _denoise(quantized)
    assert (merged - on_quantized).abs().max() / on_quantized.abs().max() < 0.05
    unmerge_boft(quantized)
    torch.testing.assert_close(_denoise(quantized), on_quantized)


def test_an_adapter_trained_at_full_precision_loads_into_a_quantized_base(tmp_path):
    from boft_diffusion.io.load import save_boft_weights
    from boft_diffusion.training.setup import load_pipeline

    full = load_pipeline(ModelArgs())
    add_boft(full.unet, BOFTConfig(boft_block_size=8, init_weights=False, target_modules=["to_q", "to_v"]))
    save_boft_weights(full, tmp_path / "adapter")
    quantized = _loaded("torchao-int8")
    load_boft_weights(quantized, tmp_path / "adapter")
    error = (_denoise(quantized) - _denoise(full)).abs().max() / _denoise(full).abs().max()
    assert 0 < error < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "flux2"])
def test_each_tiny_family_trains_on_a_quantized_denoiser_and_its_adapter_loads_at_full_precision(
    tmp_path, family
):
    """The transformer families (and SDXL's UNet) under quanto int8, their last text encoder quantized too:
    the run trains from the CLI, the adapter loads into the full-precision tiny pipeline and changes it,
    and the merged export of the quantized pipeline is a stock full-precision model."""
    import numpy as np
    from test_families import FAMILY_FAST

    from boft_diffusion import cli
    from boft_diffusion.export import export_merged
    from boft_diffusion.families import get_family

    encoders = get_family(family).text_encoders
    components = ["denoiser", encoders[-1]]
    out = tmp_path / "run"
    args = [
        "train",
        "dreambooth",
        f"train.output_dir={out}",
        f"model.tiny_family={family}",
        "model.tiny_weights=random",
    ]
    args += [
        *FAMILY_FAST,
        "model.quantization.backend=quanto-int8",
        f"model.quantization.components=[{','.join(components)}]",
    ]
    args += ["train.weighting_scheme=logit_normal"] if family == "sd3" else []
    assert cli.main(args) == 0

    def images(pipe):
        return pipe(
            prompt=["a photo of sks toy"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=64,
            width=64, output_type="np",
        ).images  # fmt: skip

    from boft_diffusion.training.setup import load_pipeline

    model = ModelArgs(tiny_family=family, tiny_weights="random")
    full = load_pipeline(model)
    base = images(full)
    load_boft_weights(full, out)
    on_full = images(full)
    assert not np.array_equal(on_full, base)
    quantized = load_pipeline(ModelArgs(tiny_family=family, tiny_weights="random",
                                        quantization=QuantizationArgs("quanto-int8", components)))  # fmt: skip
    denoiser = getattr(quantized, get_family(family).denoiser)
    assert any(quantization_of(m) == "quanto-int8" for m in denoiser.modules())
    load_boft_weights(quantized, out)
    assert np.abs(images(quantized) - on_full).max() < 0.1  # the base's int8 rounding, through 2 steps
    export_merged(quantized, tmp_path / "merged")
    assert (
        "quantization_config"
        not in (tmp_path / "merged" / get_family(family).denoiser / "config.json").read_text()
    )


def test_torchao_layers_recompute_in_backward_with_the_same_gradients():
    from boft_diffusion.quantized import recompute_in_backward

    torch.manual_seed(0)
    model = nn.Sequential(
        quantize(nn.Linear(16, 32), "torchao-int8"), nn.GELU(), quantize(nn.Linear(32, 8), "quanto-int8")
    )
    x = torch.randn(4, 16, requires_grad=True)
    model(x).square().sum().backward()
    expected, x.grad = x.grad, None
    assert (
        recompute_in_backward(model) == 1
    )  # torchao saves a dequantized weight for backward; quanto does not
    assert recompute_in_backward(model) == 0  # once
    model(x).square().sum().backward()
    torch.testing.assert_close(x.grad, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[2](model[1](model[0].forward.__wrapped__(x))))
