"""Merged single-file export of FLUX.1: the transformer alone, in Black Forest Labs' original key layout.

What diffusers makes of the file: :func:`infer_diffusers_model_type` calls the tiny file ``flux-dev``
(guidance embedding, 64 input channels), and its converter ``convert_flux_transformer_checkpoint_to_diffusers``
gives back every tensor bit for bit -- checked at FLUX.1's width (3072) on the full key set of a
2 + 2 block transformer with thin stand-in tensors, since that converter splits ``single_blocks.N.linear1``
at the hard-coded width 3072 (``inner_dim = 3072``, ``mlp_ratio = 4``) and so cannot load the tiny
(width 64) file through ``from_single_file`` (diffusers 0.42).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from boft_diffusion import BOFTConfig, add_boft_to_pipeline
from boft_diffusion.export import export_merged, merged_state_dict
from boft_diffusion.families.keys.flux import to_flux_original_layout
from boft_diffusion.inject import boft_layers
from boft_diffusion.tiny import TINY_FLUX_TRANSFORMER_CONFIG, build_tiny_flux_pipeline

TRANSFORMER = BOFTConfig(
    boft_block_size=0,
    boft_block_num=4,
    target_modules=[
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    ],
)
WIDTH = (
    TINY_FLUX_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_FLUX_TRANSFORMER_CONFIG["attention_head_dim"]
)


def adapted_pipe():
    """The tiny Flux pipeline with a transformer adapter, perturbed so its merge is not the identity."""
    assert WIDTH % TRANSFORMER.boft_block_num == 0
    pipe = build_tiny_flux_pipeline(seed=0)
    add_boft_to_pipeline(pipe, {"transformer": TRANSFORMER}, "toy")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in boft_layers(pipe.transformer).values():
            for tensor in (layer.boft_R["toy"], layer.boft_s["toy"]):
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return pipe


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    base = build_tiny_flux_pipeline(seed=0)
    base.save_pretrained(root / "base", safe_serialization=True)
    pipe = adapted_pipe()
    file = export_merged(pipe, root / "merged.safetensors", format="single_file")
    return {"base": base, "pipe": pipe, "file": file, "root": root}


def test_single_file_is_the_merged_transformer_in_bfl_layout(export):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    merged = merged_state_dict(export["pipe"].transformer)
    base = export["base"].transformer.state_dict()
    q = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(merged[q], base[q])  # the adapter is merged, not the identity
    state = load_file(export["file"])
    assert state.keys() == to_flux_original_layout(merged).keys()
    assert all(torch.equal(state[k], t) for k, t in to_flux_original_layout(merged).items())
    assert infer_diffusers_model_type(state) == "flux-dev"
    assert not any(k.startswith(("model.diffusion_model.", "vae.", "text_encoders.")) for k in state)
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for t in merged.values())
    # the fused and swapped tensors, spelled out
    qkv = [merged[f"transformer_blocks.0.attn.{p}.weight"] for p in ("to_q", "to_k", "to_v")]
    assert torch.equal(state["double_blocks.0.img_attn.qkv.weight"], torch.cat(qkv))
    ctx = [merged[f"transformer_blocks.0.attn.add_{p}_proj.bias"] for p in "qkv"]
    assert torch.equal(state["double_blocks.0.txt_attn.qkv.bias"], torch.cat(ctx))
    single = [merged[f"single_transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"]
    single.append(merged["single_transformer_blocks.0.proj_mlp.weight"])
    assert torch.equal(state["single_blocks.0.linear1.weight"], torch.cat(single))
    scale, shift = merged["norm_out.linear.weight"].chunk(2)
    assert torch.equal(state["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    with safe_open(export["file"], framework="pt") as f:
        assert f.metadata()["boft_diffusion.adapters"] == "toy:1"


def test_diffusers_converter_inverts_the_layout_exactly_at_flux_width():
    """Every key of a FLUX.1-width transformer (2 double, 2 single blocks, guidance): BFL layout and back
    through diffusers' own converter, bit for bit. Stand-in tensors keep each real first dimension
    (all the converter splits and concatenates along) with one column."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(t.shape[0], 1, generator=generator) for k, t in model.state_dict().items()}
    ckpt = to_flux_original_layout(state)
    assert infer_diffusers_model_type(ckpt) == "flux-dev"
    assert ckpt["single_blocks.1.linear1.weight"].shape[0] == 3 * 3072 + 4 * 3072
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(ckpt))
    assert back.keys() == state.keys()
    bad = [k for k in state if not torch.equal(back[k], state[k])]
    assert not bad, bad[:5]


def test_a_key_without_an_original_place_is_a_clear_refusal():
    state = dict(build_tiny_flux_pipeline(seed=0).transformer.state_dict())
    state["transformer_blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"transformer key 'transformer_blocks\.0\.attn\.extra\.weight'.*FLUX"
    ):
        to_flux_original_layout(state)
    del state["transformer_blocks.0.attn.extra.weight"]
    del state["single_transformer_blocks.0.proj_mlp.bias"]
    with pytest.raises(ValueError, match=r"single_blocks\.0\.linear1\.bias needs .*proj_mlp"):
        to_flux_original_layout(state)


def test_adapters_the_file_cannot_hold_are_refused(tmp_path):
    pipe = build_tiny_flux_pipeline(seed=0)
    add_boft_to_pipeline(pipe, {"text_encoder": BOFTConfig(boft_block_size=4)}, "te")
    with pytest.raises(ValueError, match=r"transformer only.*\['text_encoder'\].*format='diffusers'"):
        export_merged(pipe, tmp_path / "flux.safetensors", format="single_file")
    assert list(tmp_path.iterdir()) == []
