"""kohya sd-scripts network files: ``networks.boft`` read and written exactly; the rest recognised,
described, and refused where it cannot load exactly.

The files are built here exactly as sd-scripts saves them (``<Network>.save_weights``: the network's flat
``state_dict()`` through ``safetensors.torch.save_file``), with module names made as its ``create_modules``
makes them: ``prefix + "." + name + "." + child_name`` with ``.`` -> ``_``, for the children of each
targeted block class.

- BOFT (``networks.boft``, kohya-ss/sd-scripts 24d7025, PR #2428): ``BOFTNetwork._create_modules`` (Linear
  and Conv2d children of ``Transformer2DModel``, of ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D``
  with ``enable_conv``, of ``CLIPAttention`` / ``CLIPSdpaAttention`` / ``CLIPMLP``; 3x3 convs only with
  ``enable_conv``), ``native_prefix`` (``networks/orthogonal_common.py``), prefixes ``lora_unet`` /
  ``lora_te`` / ``lora_te1`` + ``lora_te2``; per module ``boft_R`` ``(m, r, b, b)`` and ``boft_s``
  ``(out, 1)`` (``BOFTModule.__init__``), trained values skew (the gradient of ``(A - A^T) / 2`` is skew).
  sd-scripts runs transformers 4.44, whose CLIP layers sit under ``text_model.``; the names here add it
  where the installed transformers has no such wrapper. The reference merge (:func:`kohya_merge`) is
  ``cayley_batch`` + ``block_butterfly_perm`` + ``perm2mat`` + ``get_rotation_and_scale`` +
  ``_rotated_weight`` of ``networks/boft.py``, transcribed in float64.
- OFTv2 (``networks.oft_v2``): per module ``oft_R.weight`` ``(r, b(b-1)/2)`` (``OFTRotationModule``).
- OFT (``networks.oft``): prefix ``oft_unet``, blocks of class ``CrossAttention`` (diffusers: ``Attention``),
  per module ``oft_blocks`` ``(dim, out // dim, out // dim)`` (zeros at init) and ``alpha`` (0-d).
- LoRA (``networks.lora``): prefixes ``lora_unet`` / ``lora_te`` (SD) / ``lora_te1`` + ``lora_te2`` (SDXL),
  blocks ``Transformer2DModel`` and ``CLIPAttention`` / ``CLIPSdpaAttention`` / ``CLIPMLP``; per module
  ``lora_down.weight`` ``(rank, in)``, ``lora_up.weight`` ``(out, rank)``, ``alpha``.
- Metadata ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_network_args`` (strings,
  train_network.py). Its training path (``create_network`` from ``--network_dim`` / ``--network_dropout`` /
  ``--network_args``, then ``load_weights``) builds the network from those alone: ``create_network_args``,
  ``choose_boft_shape``, ``pattern_allowed`` and ``create_modules`` below transcribe it.

sd-scripts' OFT rotates a layer's output rows and BOFT here its input columns
(:mod:`boft_diffusion.io.kohya`); a test below shows that gap numerically.
"""

from __future__ import annotations

import ast
import json
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import sample_images
from safetensors.torch import load_file, save_file

from boft_diffusion import BOFTConfig, add_boft_to_pipeline, load_boft_weights, save_boft_weights, unload_boft
from boft_diffusion.inject import boft_layers
from boft_diffusion.io import (
    AdapterFormatError,
    detect_format,
    get_boft_adapter,
    is_kohya_adapter,
    read_adapter,
    read_kohya_adapter,
    read_kohya_network,
    write_kohya_adapter,
)
from boft_diffusion.io.kohya_args import NETWORK_ARGS, network_args_of
from boft_diffusion.pipeline import pipeline_components
from boft_diffusion.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline


def kohya_names(
    root: torch.nn.Module, prefix: str, block_classes: tuple[str, ...]
) -> dict[str, torch.nn.Linear]:
    """sd-scripts' ``create_modules``: ``{kohya module name: Linear}`` for the Linear children of each block."""
    names = {}
    for name, module in root.named_modules():
        if type(module).__name__ in block_classes:
            for child_name, child in module.named_modules():
                if type(child).__name__ == "Linear":
                    names[f"{prefix}.{name}.{child_name}".replace(".", "_")] = child
    return names


def oft_state(unet: torch.nn.Module, dim: int = 4, alpha: float = 1e-3, seed: int = 0) -> dict:
    """What ``OFTNetwork(...).state_dict()`` holds after training (random ``oft_blocks``)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, linear in kohya_names(unet, "oft_unet", ("Attention", "CrossAttention")).items():
        block = linear.out_features // dim
        state[f"{name}.oft_blocks"] = 0.01 * torch.randn(dim, block, block, generator=gen)
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def lora_state(pipe, rank: int = 2) -> dict:
    """What ``LoRANetwork(...).state_dict()`` holds, SD (``lora_te``) or SDXL (``lora_te1``/``lora_te2``)."""
    roots = [("lora_unet", pipe.unet, ("Transformer2DModel",))]
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    clip = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
    for index, encoder in enumerate(encoders, start=1):
        roots.append((f"lora_te{index}" if len(encoders) > 1 else "lora_te", encoder, clip))
    state = {}
    for prefix, root, classes in roots:
        for name, linear in kohya_names(root, prefix, classes).items():
            state[f"{name}.lora_down.weight"] = torch.randn(rank, linear.in_features)
            state[f"{name}.lora_up.weight"] = torch.zeros(linear.out_features, rank)
            state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


def metadata(module: str, dim: int, alpha: float) -> dict[str, str]:
    return {"ss_network_module": module, "ss_network_dim": str(dim), "ss_network_alpha": str(alpha)}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(weights="random")


@pytest.fixture(scope="module")
def oft_file(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("kohya") / "oft.safetensors"
    save_file(oft_state(pipe.unet), path, metadata=metadata("networks.oft", 4, 1e-3))
    return path


def test_oft_file_is_recognised_and_described(oft_file, pipe):
    assert is_kohya_adapter(oft_file) and detect_format(oft_file).kind == "kohya_oft"
    network = read_kohya_network(oft_file)
    assert (network.kind, network.variant, network.components) == ("OFT", "networks.oft", ["unet"])
    expected = kohya_names(pipe.unet, "oft_unet", ("Attention",))
    assert set(network.shapes) == set(expected) and len(expected) > 0
    name = "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert name in network.shapes and network.shapes[name]["alpha"] == ()


def test_load_boft_weights_refuses_an_oft_file_and_changes_nothing(oft_file, pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(AdapterFormatError, match="rotates each layer's outputs") as err:
        load_boft_weights(pipe, oft_file)
    assert str(oft_file) in str(err.value) and "networks.oft" in str(err.value)
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(AdapterFormatError, match="cannot be loaded exactly"):
        read_adapter(oft_file)


def test_sd_scripts_oft_rotates_outputs_which_no_input_rotation_matches():
    """Mirror of ``OFTModule.get_weight`` + ``forward`` (networks/oft.py lines 73-110): ``W' = R^T W``."""
    torch.manual_seed(0)
    num_blocks, out_dim, in_dim = 2, 8, 8
    weight = torch.randn(out_dim, in_dim, dtype=torch.float64)
    blocks = 0.3 * torch.randn(num_blocks, out_dim // num_blocks, out_dim // num_blocks, dtype=torch.float64)
    q = blocks - blocks.transpose(1, 2)
    eye = torch.eye(out_dim // num_blocks, dtype=torch.float64).expand_as(q)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    rw = torch.einsum("k n m, k n p -> k m p", r, weight.reshape(num_blocks, out_dim // num_blocks, in_dim))
    rotated = rw.reshape(out_dim, in_dim)
    assert torch.allclose(rotated, torch.block_diag(*r).T @ weight)  # the output side
    m_t = torch.linalg.solve(weight, rotated)  # the only input-side M^T with W M^T = R^T W
    assert (m_t @ m_t.T - torch.eye(in_dim, dtype=torch.float64)).abs().max() > 1e-2  # ... is not orthogonal


def test_sdxl_lora_naming_is_refused_as_lora(tmp_path):
    sdxl = build_tiny_sdxl_pipeline()
    path = tmp_path / "sdxl_lora.safetensors"
    save_file(lora_state(sdxl), path, metadata=metadata("networks.lora", 2, 2))
    network = read_kohya_network(path)
    assert network.kind == "LoRA" and network.components == ["text_encoder", "text_encoder_2", "unet"]
    assert any(n.startswith("lora_te2_text_model_encoder_layers_0_self_attn") for n in network.shapes)
    with pytest.raises(AdapterFormatError, match="this is a kohya LoRA network .*, not OFT/BOFT") as err:
        load_boft_weights(sdxl, path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "leaves, kind",
    [
        ({"hada_w1_a": (2, 8), "hada_w1_b": (2, 8), "hada_w2_a": (2, 8), "hada_w2_b": (2, 8)}, "LoHa"),
        ({"lokr_w1": (2, 2), "lokr_w2": (4, 4)}, "LoKr"),
        ({"diff": (8, 8), "diff_b": (8,)}, "full difference"),
    ],
)
def test_other_network_types_are_refused_by_name(tmp_path, leaves, kind):
    path = tmp_path / "net.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.{leaf}": torch.ones(shape) for leaf, shape in leaves.items()}, path)
    with pytest.raises(AdapterFormatError, match=f"this is a kohya {kind} network"):
        read_kohya_adapter(path)


def test_lycoris_and_flux_oft_variants_are_refused(tmp_path):
    boft = tmp_path / "boft.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.oft_blocks": torch.zeros(2, 4, 2, 2), f"{name}.rescale": torch.ones(8, 1)}, boft)
    flux = tmp_path / "flux.safetensors"
    qkv = "oft_unet_double_blocks_0_img_attn_qkv"
    save_file(
        {f"{qkv}.oft_blocks.{i}": torch.zeros(4, 2, 2) for i in range(3)}
        | {f"{qkv}.alpha": torch.tensor(1.0)},
        flux,
    )
    for path, variant in ((boft, "LyCORIS BOFT"), (flux, "networks.oft_flux")):
        assert read_kohya_network(path).variant == variant
        with pytest.raises(AdapterFormatError, match=f"{variant}.*rotates each layer's outputs"):
            read_kohya_adapter(path)
    assert read_kohya_network(flux).components == ["transformer"]


def test_broken_oft_files_are_refused_as_broken(tmp_path, pipe):
    state = oft_state(pipe.unet)
    first = next(k for k in state if k.endswith(".oft_blocks"))
    nan = tmp_path / "nan.safetensors"
    save_file(state | {first: torch.full_like(state[first], float("nan"))}, nan)
    with pytest.raises(AdapterFormatError, match="non-finite"):
        read_kohya_adapter(nan)
    flat = tmp_path / "flat.safetensors"
    save_file(state | {first: state[first].flatten(1).contiguous()}, flat)
    with pytest.raises(AdapterFormatError, match=r"oft_blocks \(blocks, b, b\)"):
        read_kohya_adapter(flat)


def test_project_and_peft_adapters_are_not_kohya(tmp_path):
    pipe = build_tiny_pipeline(weights="random")
    add_boft_to_pipeline(pipe, {"unet": BOFTConfig(boft_block_size=4)})
    file = save_boft_weights(pipe, tmp_path / "project")
    assert not is_kohya_adapter(file) and not is_kohya_adapter(tmp_path / "project")
    assert read_adapter(file).configs["unet"].boft_block_size == 4  # read_adapter still reads it


# --- networks.boft -------------------------------------------------------------------------------
EXCLUDE = (r".*mlp\.fc2",)
"""``exclude_patterns``: the tiny CLIP's ``fc2`` has 37 inputs, for which sd-scripts' ``auto_adjust`` picks
block size 1 (another layout than the other layers; with 2 factors no valid one at all)."""
CLIP_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")  # TEXT_ENCODER_TARGET_REPLACE_MODULE
UNET_BLOCKS = ("Transformer2DModel",)  # UNET_TARGET_REPLACE_MODULE
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # UNET_TARGET_REPLACE_MODULE_CONV2D_3X3


def boft_targets(root, prefix: str, classes: tuple[str, ...], enable_conv: bool, exclude=EXCLUDE) -> dict:
    """``BOFTNetwork._create_modules``: ``{kohya name: (path in root, layer)}`` for the Linear / Conv2d
    children of each block of ``classes`` (a 3x3 conv only with ``enable_conv``), but those whose name
    ``re.fullmatch``-es an ``exclude`` pattern (``_pattern_allowed``, ``exclude_patterns``)."""
    targets = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            kind = type(child).__name__
            if kind not in ("Linear", "Conv2d") or (
                kind == "Conv2d" and child.kernel_size != (1, 1) and not enable_conv
            ):
                continue
            path = f"{name}.{child_name}" if child_name else name
            original = (
                path if prefix == "lora_unet" or path.startswith("text_model.") else f"text_model.{path}"
            )
            if any(re.fullmatch(pattern, original) for pattern in exclude):
                continue
            targets[f"{prefix}.{original}".replace(".", "_")] = (path, child)
    return targets


def in_features(layer) -> int:
    """``get_in_features`` (orthogonal_common.py): Linear ``in_features``, Conv2d ``in * kh * kw``."""
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features
    return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]


def boft_network_state(pipe, block_size=4, factors=2, enable_conv=True, seed=0, dtype=torch.float32) -> dict:
    """What ``BOFTNetwork(...).state_dict()`` holds after training: per module ``boft_R`` ``(m, r, b, b)``
    (random skew, as training leaves it) and ``boft_s`` ``(out, 1)`` (random around 1)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, root, classes in sd_scripts_roots(pipe, enable_conv):
        for name, (_, layer) in boft_targets(root, prefix, classes, enable_conv).items():
            blocks = in_features(layer) // block_size
            assert blocks * block_size == in_features(layer) and blocks % 2 ** (factors - 1) == 0
            a = 0.2 * torch.randn(factors, blocks, block_size, block_size, generator=gen)
            state[f"{name}.boft_R"] = (a - a.transpose(-1, -2)).to(dtype)
            out = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
            state[f"{name}.boft_s"] = (1 + 0.1 * torch.randn(out, 1, generator=gen)).to(dtype)
    return state


def sd_scripts_roots(pipe, enable_conv=True):
    """``(prefix, root, block classes)`` as ``BOFTNetwork.__init__`` walks them (SDXL: no UNet here)."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    roots = []
    for index, encoder in enumerate(encoders, start=1):
        roots.append((f"lora_te{index}" if len(encoders) > 1 else "lora_te", encoder, CLIP_BLOCKS))
    if len(encoders) == 1:
        roots.append(("lora_unet", pipe.unet, UNET_BLOCKS + (UNET_CONV_BLOCKS if enable_conv else ())))
    return roots


def boft_metadata(block_size=4, factors=2) -> dict[str, str]:
    """train_network.py's metadata for ``--network_module networks.boft --network_dim 4 --network_args ...``."""
    return {
        "ss_network_module": "networks.boft",
        "ss_network_dim": str(block_size),
        "ss_network_alpha": "1.0",
        "ss_network_args": json.dumps(
            {
                "boft_n_butterfly_factor": str(factors),
                "enable_conv": "true",
                "exclude_patterns": str(list(EXCLUDE)),
            }
        ),
        "ss_base_model_version": "sd_v1",
        "sshs_model_hash": "0" * 64,
        "sshs_legacy_hash": "0" * 8,
    }


def block_butterfly_perm(n, b, r=3, n_butterfly_factor=1):
    """``BOFTModule.block_butterfly_perm`` (networks/boft.py), verbatim."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    block_size = int(n // b)
    indices = torch.arange(n)

    def sort_block(block_len, base):
        step = block_len / base
        initial_order = torch.arange(block_len)
        sorted_order = torch.empty(block_len, dtype=torch.long)
        evens = torch.arange(0, step, 2)
        odds = torch.arange(1, step, 2)
        sorted_seq = torch.cat((evens, odds), dim=0)
        for j, pos in enumerate(sorted_seq):
            sorted_order[int(j * base) : int(j * base + base)] = initial_order[
                int(pos * base) : int(pos * base + base)
            ]
        return sorted_order

    sorted_order = sort_block(block_size, r)
    for i in range(0, n, block_size):
        tmp_indices = indices[i : i + block_size]
        indices[i : i + block_size] = tmp_indices[sorted_order]
    return indices


def kohya_merge(weight: torch.Tensor, boft_r: torch.Tensor, boft_s: torch.Tensor) -> torch.Tensor:
    """``BOFTModule.merge_to`` at multiplier 1 (``cayley_batch``, ``get_rotation_and_scale``,
    ``_rotated_weight``), in float64: ``W' = (M W_flat^T)^T * s``, ``M = F_{m-1} ... F_0``."""
    m, r, b, _ = boft_r.shape
    data = boft_r.double().reshape(m * r, b, b)
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(b, dtype=torch.float64).expand(m * r, b, b)
    blocks = torch.linalg.solve(eye + skew, eye - skew, left=False).view(m, r, b, b)
    n = r * b
    rotation = None
    for i in range(m):
        perm = block_butterfly_perm(n, int(r / (2**i)), int(b / 2), m - 1)
        p = torch.zeros(n, n, dtype=torch.float64)
        p[torch.arange(n), perm] = 1  # perm2mat
        factor = p @ (torch.block_diag(*torch.unbind(blocks[i])) @ p.T)
        rotation = factor if rotation is None else factor @ rotation
    flat = weight.double().reshape(weight.shape[0], -1)
    return ((rotation @ flat.T).T * boft_s.double().reshape(-1, 1)).reshape(weight.shape)


def snapshot(pipe) -> dict:
    return {
        comp: {k: v.clone() for k, v in module.state_dict().items()}
        for comp, module in pipeline_components(pipe).items()
    }


def assert_unchanged(pipe, before: dict) -> None:
    for comp, module in pipeline_components(pipe).items():
        assert not boft_layers(module), comp
        after = module.state_dict()
        assert after.keys() == before[comp].keys(), comp
        assert all(torch.equal(after[k], v) for k, v in before[comp].items()), comp


@pytest.fixture(scope="module")
def boft_file(pipe, tmp_path_factory):
    """A ``networks.boft`` file for the tiny SD pipeline: UNet with 3x3 convs, 2 butterfly factors, text encoder."""
    path = tmp_path_factory.mktemp("kohya_boft") / "boft.safetensors"
    save_file(boft_network_state(pipe), path, metadata=boft_metadata())
    return path


def test_boft_file_is_detected_and_described(boft_file, pipe):
    assert is_kohya_adapter(boft_file)
    detected = detect_format(boft_file)
    assert (detected.kind, detected.variant) == ("kohya_boft", "networks.boft")
    network = read_kohya_network(boft_file)
    assert (network.kind, network.variant, network.components) == (
        "BOFT",
        "networks.boft",
        ["text_encoder", "unet"],
    )
    names = set(network.shapes)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in names
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names  # 3x3 conv (enable_conv)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names  # 1x1 conv
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert network.shapes[name]["boft_R"][0] == 2 and network.shapes[name]["boft_s"][1] == 1


def test_boft_file_merges_as_sd_scripts_merges(boft_file):
    """(3) Every layer merged here equals sd-scripts' ``merge_to`` (transcribed, float64) of the file."""
    target = build_tiny_pipeline(weights="random")
    state = load_file(boft_file)
    expected = {}
    for prefix, root, classes in sd_scripts_roots(target):
        for name, (path, layer) in boft_targets(root, prefix, classes, True).items():
            expected[(prefix, path)] = kohya_merge(
                layer.weight, state[f"{name}.boft_R"], state[f"{name}.boft_s"]
            )
    load_boft_weights(target, boft_file)
    components = {"lora_te": target.text_encoder, "lora_unet": target.unet}
    seen = set()
    for (prefix, path), reference in expected.items():
        layer = boft_layers(components[prefix])[path]
        merged = layer.merged_weight()
        torch.testing.assert_close(merged.double(), reference, rtol=1e-5, atol=2e-6)
        seen.add(type(layer).__name__)
    assert seen == {"BOFTLinear", "BOFTConv2d"}
    assert sum(len(boft_layers(m)) for m in components.values()) == len(expected)


def test_boft_file_read_write_round_trip_is_exact(boft_file, tmp_path):
    """(2) kohya file -> read -> write: same keys, equal tensors, the metadata kept (hashes too: same tensors)."""
    adapter = read_kohya_adapter(boft_file)
    assert adapter.configs["unet"].boft_n_butterfly_factor == 2
    assert adapter.configs["unet"].boft_block_size == 4
    out = write_kohya_adapter(adapter, tmp_path / "again.safetensors")
    original, again = load_file(boft_file), load_file(out)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], v) and again[k].dtype == v.dtype for k, v in original.items())
    assert read_kohya_network(out).metadata == read_kohya_network(boft_file).metadata


def test_half_precision_boft_file_round_trips_in_its_dtype(pipe, tmp_path):
    path = tmp_path / "fp16.safetensors"
    state = boft_network_state(pipe, factors=1, enable_conv=False, seed=3, dtype=torch.float16)
    save_file(state, path, metadata=boft_metadata(factors=1))
    out = write_kohya_adapter(read_adapter(path), tmp_path / "again.safetensors")
    again = load_file(out)
    assert again.keys() == state.keys()
    assert all(again[k].dtype == torch.float16 and torch.equal(again[k], v) for k, v in state.items())


@pytest.mark.filterwarnings("ignore:.*would not rebuild this network")  # reading it back says so again
def test_project_adapter_to_kohya_and_back_is_exact(tmp_path):
    """(1) random non-identity rotations and scales -> kohya file -> read: equal tensors, identical images."""
    source = build_tiny_pipeline(weights="random")
    torch.manual_seed(4)
    add_boft_to_pipeline(
        source,
        {
            "unet": BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False),
            "text_encoder": BOFTConfig(boft_block_size=4, init_weights=False),
        },
    )
    with torch.no_grad():
        for module in (source.unet, source.text_encoder):
            for layer in boft_layers(module).values():
                layer.boft_s["default"].mul_(1 + 0.1 * torch.randn_like(layer.boft_s["default"]))
    adapter = get_boft_adapter(source)
    with pytest.warns(UserWarning, match="has 2 butterfly factors, not 1 .* --dim_from_weights"):
        path = write_kohya_adapter(adapter, tmp_path / "ours.safetensors")  # factors: 2 and 1
    stored = load_file(path)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert stored[f"{name}.boft_R"].shape[::2] == (2, 4) and stored[f"{name}.boft_s"].shape[1] == 1
    assert torch.equal(stored[f"{name}.boft_R"], -stored[f"{name}.boft_R"].transpose(-1, -2))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in stored)
    metadata = read_kohya_network(path).metadata
    assert metadata["ss_network_module"] == "networks.boft"
    args = json.loads(metadata["ss_network_args"])
    assert args["boft_block_size"] == "4" and "boft_n_butterfly_factor" not in args
    assert metadata["ss_network_dim"] == "4"

    back = read_adapter(path)
    assert back.tensors.keys() == adapter.tensors.keys()
    for comp, tensors in adapter.tensors.items():
        assert back.tensors[comp].keys() == tensors.keys(), comp
        assert all(torch.equal(back.tensors[comp][k], t) for k, t in tensors.items()), comp
        assert back.configs[comp].boft_n_butterfly_factor == adapter.configs[comp].boft_n_butterfly_factor
    target = build_tiny_pipeline(weights="random")
    load_boft_weights(target, path)
    assert np.array_equal(sample_images(target), sample_images(source))


def test_sdxl_text_encoders_use_te1_te2_names_and_round_trip(tmp_path):
    sdxl = build_tiny_sdxl_pipeline()
    path = tmp_path / "sdxl.safetensors"
    state = boft_network_state(sdxl, factors=2, seed=5)
    save_file(state, path, metadata=boft_metadata() | {"ss_base_model_version": "sdxl_base_v1-0"})
    assert {n.split("_text_model")[0] for n in read_kohya_network(path).shapes} == {"lora_te1", "lora_te2"}
    expected = {}
    for prefix, root, classes in sd_scripts_roots(sdxl):
        for name, (layer_path, layer) in boft_targets(root, prefix, classes, False).items():
            expected[(prefix, layer_path)] = kohya_merge(
                layer.weight, state[f"{name}.boft_R"], state[f"{name}.boft_s"]
            )
    load_boft_weights(sdxl, path)
    components = {"lora_te1": sdxl.text_encoder, "lora_te2": sdxl.text_encoder_2}
    for (prefix, layer_path), reference in expected.items():
        merged = boft_layers(components[prefix])[layer_path].merged_weight()
        torch.testing.assert_close(merged.double(), reference, rtol=1e-5, atol=2e-6)
    adapter = get_boft_adapter(sdxl)
    out = write_kohya_adapter(adapter, tmp_path / "again.safetensors")
    again = load_file(out)
    assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())


def test_only_the_skew_part_of_a_generator_counts(pipe, tmp_path):
    """``cayley_batch`` uses ``(A - A^T) / 2``: an ``A`` with a symmetric part reads as its skew part (same
    merge; written back as that skew part), and a ``(1, out)`` ``boft_s`` as ``(out, 1)`` (``_adapt_state``)."""
    state = boft_network_state(pipe, factors=1, enable_conv=False, seed=9)
    gen = torch.Generator().manual_seed(1)
    noisy = {}
    for key, tensor in state.items():
        if key.endswith(".boft_R"):
            sym = torch.randn(tensor.shape, generator=gen)
            noisy[key] = tensor + sym + sym.transpose(-1, -2)
        else:
            noisy[key] = tensor.reshape(1, -1).contiguous()
    save_file(state, tmp_path / "skew.safetensors")
    save_file(noisy, tmp_path / "noisy.safetensors")
    skew, other = read_adapter(tmp_path / "skew.safetensors"), read_adapter(tmp_path / "noisy.safetensors")
    for comp, tensors in skew.tensors.items():
        for key, tensor in tensors.items():  # equal up to the rounding of (A + S) - (A + S)^T
            torch.testing.assert_close(other.tensors[comp][key], tensor, rtol=0, atol=1e-6)


# --- networks.boft's training path: create_network from the file's own metadata, transcribed -----------
# sd-scripts 24d7025: train_network.py builds the network from --network_dim / --network_dropout /
# --network_args (the values a file records as ss_network_dim / ss_network_dropout / ss_network_args) with
# networks/boft.py's create_network, then applies it and loads the file with load_weights. Nothing here reads
# the tensors' shapes: that is the point (create_network_from_weights does, and is tested above).
def str_to_bool(value, default=False):
    """``str_to_bool`` (orthogonal_common.py), verbatim."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes", "y", "on")


def str_to_int(value, default=None):
    return default if value is None else int(value)


def str_to_float(value, default=None):
    return default if value is None else float(value)


def parse_patterns(value):
    """``parse_patterns`` (orthogonal_common.py), verbatim."""
    if value is None:
        return None
    if isinstance(value, list):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (SyntaxError, ValueError):
        return [str(value)]
    return parsed if isinstance(parsed, list) else [parsed]


def create_network_args(network_dim, neuron_dropout, kwargs):
    """``_create_network_args`` (networks/boft.py), verbatim."""
    explicit_block_size = kwargs.get("boft_block_size", kwargs.get("block_size", None))
    explicit_block_num = kwargs.get("boft_block_num", kwargs.get("block_num", None))
    block_size = str_to_int(explicit_block_size, None)
    block_num = str_to_int(explicit_block_num, 0)
    if block_size is None:
        block_size = network_dim if network_dim is not None else 4
    dropout = (
        neuron_dropout
        if neuron_dropout is not None
        else str_to_float(kwargs.get("boft_dropout", kwargs.get("dropout", None)), None)
    )
    return {
        "block_size": block_size,
        "block_num": block_num,
        "boft_n_butterfly_factor": str_to_int(kwargs.get("boft_n_butterfly_factor", None), 1),
        "dropout": dropout,
        "enable_conv": str_to_bool(kwargs.get("enable_conv", None), False),
        "auto_adjust": str_to_bool(kwargs.get("auto_adjust", None), True),
        "include_patterns": parse_patterns(kwargs.get("include_patterns", None)),
        "exclude_patterns": parse_patterns(kwargs.get("exclude_patterns", None)),
    }


def adjust_block_size(in_features, block_size):
    """``adjust_block_size`` (orthogonal_common.py), verbatim."""
    if block_size <= 0:
        raise ValueError("block size must be positive")
    if in_features % block_size == 0 and block_size <= in_features:
        return block_size
    if block_size >= in_features:
        return in_features
    higher = block_size
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = block_size
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    if higher > in_features:
        return lower
    return lower if (block_size - lower) <= (higher - block_size) else higher


def valid_boft_shape(in_features, block_size, block_num, num_factors):
    """``_valid_boft_shape`` (networks/boft.py), verbatim."""
    if block_size <= 0 or block_num <= 0 or block_size * block_num != in_features:
        return False
    internal_factors = num_factors - 1
    if internal_factors <= 0:
        return True
    return (
        block_num % (2**internal_factors) == 0
        and block_size % 2 == 0
        and block_num % 2 == 0
        and in_features % (block_size * (2**internal_factors)) == 0
    )


def choose_boft_shape(in_features, requested_block_size, requested_block_num, num_factors, auto_adjust):
    """``_choose_boft_shape`` (networks/boft.py), verbatim but for the messages."""
    if requested_block_size and requested_block_num:
        raise ValueError("Specify only one of boft_block_size or boft_block_num")
    if requested_block_num:
        if in_features % requested_block_num != 0:
            raise ValueError(f"in_features ({in_features}) must be divisible by boft_block_num")
        block_num = requested_block_num
        block_size = in_features // block_num
        if not valid_boft_shape(in_features, block_size, block_num, num_factors):
            raise ValueError(f"Invalid BOFT shape: in_features={in_features}, block_num={block_num}")
        return block_size, block_num
    requested_block_size = requested_block_size or 4
    if in_features % requested_block_size == 0:
        block_size = requested_block_size
    elif auto_adjust:
        block_size = adjust_block_size(in_features, requested_block_size)
    else:
        raise ValueError(f"in_features ({in_features}) must be divisible by boft_block_size")
    block_num = in_features // block_size
    if valid_boft_shape(in_features, block_size, block_num, num_factors):
        return block_size, block_num
    if not auto_adjust:
        raise ValueError(f"Invalid BOFT shape: in_features={in_features}, block_size={block_size}")
    divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
    divisors.sort(key=lambda d: (abs(d - requested_block_size), d))
    for candidate_size in divisors:
        candidate_num = in_features // candidate_size
        if valid_boft_shape(in_features, candidate_size, candidate_num, num_factors):
            return candidate_size, candidate_num
    raise ValueError(f"Cannot find a valid BOFT block shape for in_features={in_features}")


def pattern_allowed(args, original_name):
    """``BOFTNetwork._pattern_allowed``, verbatim."""
    include, exclude = args["include_patterns"], args["exclude_patterns"]
    if exclude and any(re.fullmatch(pattern, original_name) for pattern in exclude):  # noqa: SIM102 (verbatim)
        if not include or not any(re.fullmatch(pattern, original_name) for pattern in include):
            return False
    if include:
        return any(re.fullmatch(pattern, original_name) for pattern in include)
    return True


def create_modules(args, prefix, root, target_replace_modules):
    """``BOFTNetwork._create_modules`` with ``modules_state=None`` (create_network): ``{lora_name: (boft_R
    shape, boft_s shape)}`` as ``BOFTModule.__init__`` makes them. transformers 5's ``CLIPTextModel`` has no
    ``text_model`` wrapper; it is added to the names, as sd-scripts' transformers 4 has it."""
    modules = {}
    for name, module in root.named_modules():
        if module.__class__.__name__ not in target_replace_modules:
            continue
        for child_name, child in module.named_modules():
            kind = child.__class__.__name__
            if kind not in ("Linear", "Conv2d"):
                continue
            if kind == "Conv2d" and not (child.kernel_size == (1, 1) or args["enable_conv"]):
                continue
            original_name = f"{name}.{child_name}" if child_name else name
            if prefix != "lora_unet" and not original_name.startswith("text_model."):
                original_name = f"text_model.{original_name}"
            if not pattern_allowed(args, original_name):
                continue
            factors = args["boft_n_butterfly_factor"]
            size, num = choose_boft_shape(
                in_features(child), args["block_size"], args["block_num"], factors, args["auto_adjust"]
            )
            out = child.out_features if kind == "Linear" else child.out_channels
            modules[f"{prefix}.{original_name}".replace(".", "_")] = ((factors, num, size, size), (out, 1))
    return modules


def sd_scripts_create_network(metadata, text_encoders, unet=None) -> dict:
    """``train_network.py --network_module networks.boft --network_dim D --network_dropout P --network_args
    k=v ...`` with the file's own ``ss_network_dim`` / ``ss_network_dropout`` / ``ss_network_args``:
    ``net_kwargs``, ``create_network`` and ``BOFTNetwork.__init__`` (prefixes, targets), all modules applied."""
    recorded = lambda key: None if metadata.get(key) in (None, "None") else metadata[key]  # noqa: E731
    network_dim = None if recorded("ss_network_dim") is None else int(recorded("ss_network_dim"))
    network_dropout = (
        None if recorded("ss_network_dropout") is None else float(recorded("ss_network_dropout"))
    )
    net_kwargs = {k: v for k, v in json.loads(metadata.get("ss_network_args", "{}")).items() if v is not None}
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = network_dropout  # train_network.py's "workaround for LyCORIS"
    args = create_network_args(network_dim, network_dropout, net_kwargs)
    modules = {}
    for index, encoder in enumerate(text_encoders):
        prefix = "lora_te" if len(text_encoders) == 1 else f"lora_te{index + 1}"
        modules |= create_modules(args, prefix, encoder, CLIP_BLOCKS)
    if unet is not None:
        targets = UNET_BLOCKS + (UNET_CONV_BLOCKS if args["enable_conv"] else ())
        modules |= create_modules(args, "lora_unet", unet, targets)
    return modules


def sd_scripts_load_weights(modules: dict, state: dict) -> tuple[list, list, list]:
    """``BOFTNetwork.load_weights`` then ``load_state_dict(strict=False)``: the keys it ignores ("ignored N
    BOFT weight keys"), the modules left without their keys, and the keys whose shape differs (which
    ``load_state_dict`` refuses)."""
    used, without, wrong = set(), [], []
    for name, shapes in modules.items():
        keys = [f"{name}.{leaf}" for leaf in ("boft_R", "boft_s")]
        without += [name] if not all(k in state for k in keys) else []
        for key, shape in zip(keys, shapes):
            if key in state:
                used.add(key)
                shape_in_file = tuple(state[key].shape)
                if (
                    key.endswith("boft_s") and shape_in_file[::-1] == shape
                ):  # _adapt_state transposes (1, out)
                    shape_in_file = shape
                wrong += [key] if shape_in_file != shape else []
    return sorted(set(state) - used), without, wrong


def conv_and_attention_adapter(pipe, **config) -> None:
    """BOFT on the UNet's attention, its ResNet convolutions (3x3 conv1 / conv2) and its samplers' convs,
    and on the text encoder's attention (random rotations and scales, as after training)."""
    torch.manual_seed(0)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv"]
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    add_boft_to_pipeline(
        pipe,
        {
            "unet": BOFTConfig(target_modules=unet_targets, init_weights=False, **config),
            "text_encoder": BOFTConfig(target_modules=text_targets, init_weights=False, **config),
        },
    )


@pytest.mark.parametrize(
    "case",
    ["unet-convs-and-text-encoder", "block-number-unet-only", "sdxl-text-encoders"],
)
def test_sd_scripts_create_network_rebuilds_the_written_network(tmp_path, case):
    """The training path: a network built by sd-scripts' ``create_network`` from the file's own metadata
    (as when a user continues training it) has a module for every key of the file and every key for each of
    its modules, each of the file's shape; no layout is read from the tensors."""
    if case == "sdxl-text-encoders":
        pipe, base = build_tiny_sdxl_pipeline(), build_tiny_sdxl_pipeline()
        config = BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"], init_weights=False)
        add_boft_to_pipeline(pipe, {"text_encoder": config, "text_encoder_2": config})
    else:
        pipe, base = build_tiny_pipeline(weights="random"), build_tiny_pipeline(weights="random")
        if case == "block-number-unet-only":  # block sizes 8 and 16: one block number, no block size
            config = BOFTConfig(
                boft_block_size=0,
                boft_block_num=4,
                boft_n_butterfly_factor=2,
                target_modules=["to_k", "proj_in"],
            )
            add_boft_to_pipeline(pipe, {"unet": config})
        else:
            conv_and_attention_adapter(pipe, boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.1)
    path = write_kohya_adapter(get_boft_adapter(pipe), tmp_path / "adapter.safetensors", pipe=pipe)
    metadata = read_kohya_network(path).metadata
    encoders = [base.text_encoder] + ([base.text_encoder_2] if case == "sdxl-text-encoders" else [])
    # sd-scripts' SDXL UNet is its own class (input_blocks ...); no UNet layer name is a text_model.* name
    unet = None if case == "sdxl-text-encoders" else base.unet
    modules = sd_scripts_create_network(metadata, encoders, unet)
    state = load_file(path)
    ignored, without_keys, wrong_shape = sd_scripts_load_weights(modules, state)
    assert modules and not ignored and not without_keys and not wrong_shape
    assert len(modules) * 2 == len(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read back: every recorded argument accepted, every layer rebuilt
        back = read_kohya_adapter(path)
    assert {c.boft_dropout for c in back.configs.values()} == {
        0.1 if case == "unet-convs-and-text-encoder" else 0.0
    }
    if case == "unet-convs-and-text-encoder":
        assert "lora_unet_down_blocks_0_resnets_0_conv1" in modules  # a 3x3 conv: enable_conv
        assert "lora_unet_up_blocks_0_upsamplers_0_conv" in modules
        args = json.loads(metadata["ss_network_args"])
        assert sorted(args) == sorted(NETWORK_ARGS)
        assert create_network_args(None, None, args)["dropout"] == 0.1


def test_a_file_without_enable_conv_warns_on_read_and_is_mended_on_write(tmp_path):
    """The issue's file: convs adapted, but ``ss_network_args`` lacking ``enable_conv`` (as written before):
    reading it says which layer sd-scripts' ``create_network`` would not build; writing it back (the same
    tensors) records arguments that rebuild it."""
    pipe = build_tiny_pipeline(weights="random")
    state = boft_network_state(pipe)  # UNet with 3x3 convs, text encoder, 2 factors of 4
    old = boft_metadata() | {
        "ss_network_args": json.dumps({"boft_block_size": "4", "boft_n_butterfly_factor": "2"})
    }
    path = tmp_path / "old.safetensors"
    save_file(state, path, metadata=old)
    with pytest.warns(UserWarning, match="is built only with enable_conv=true"):
        adapter = read_kohya_adapter(path)
    out = write_kohya_adapter(adapter, tmp_path / "mended.safetensors")
    again = load_file(out)
    assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
    modules = sd_scripts_create_network(read_kohya_network(out).metadata, [pipe.text_encoder], pipe.unet)
    assert sd_scripts_load_weights(modules, again) == ([], [], [])


@pytest.mark.parametrize(
    "args, message",
    [
        (
            {"boft_n_butterfly_factor": "two"},
            "boft_n_butterfly_factor 'two' in the metadata is not an integer",
        ),
        ({"boft_block_size": "4.5"}, "boft_block_size '4.5' in the metadata is not an integer"),
        ({"boft_dropout": "1.5"}, r"dropout 1.5 in the metadata is not in \[0, 1\)"),
        ({"include_patterns": "['(unclosed']"}, "include_patterns: '\\(unclosed' is no regex"),
        ({"exclude_patterns": "[3]"}, "exclude_patterns: 3 is no regex"),
        ({"boft_n_butterfly_factor": "0"}, "sd-scripts needs sizes >= 0 and factors >= 1"),
    ],
)
def test_network_args_sd_scripts_could_not_parse_are_refused(pipe, tmp_path, args, message):
    path = tmp_path / "bad.safetensors"
    save_file(
        boft_network_state(pipe, factors=1, enable_conv=False),
        path,
        metadata={"ss_network_args": json.dumps(args)},
    )
    with pytest.raises(AdapterFormatError, match=message) as err:
        read_kohya_adapter(path)
    assert str(path) in str(err.value)


def test_network_args_are_read_as_sd_scripts_reads_them():
    """:func:`network_args_of` against the transcribed ``_create_network_args``, on what sd-scripts and the
    writer record (aliases, ``--network_dim`` as the block size, ``--network_dropout`` first)."""
    cases = [
        ({"ss_network_dim": "8"}, {"enable_conv": "True", "dropout": "0.2"}),
        (
            {"ss_network_dim": "None", "ss_network_dropout": "0.05"},
            {"block_num": "4", "boft_block_size": "0"},
        ),
        ({}, {"boft_n_butterfly_factor": "3", "auto_adjust": "no", "exclude_patterns": r".*mlp\.fc2"}),
        ({}, {"include_patterns": str([re.escape("down_blocks.0.attentions.0.proj_in")])}),
    ]
    for extra, args in cases:
        ours = network_args_of(extra | {"ss_network_args": json.dumps(args)})
        dim = None if extra.get("ss_network_dim", "None") == "None" else int(extra["ss_network_dim"])
        dropout = float(extra["ss_network_dropout"]) if "ss_network_dropout" in extra else None
        theirs = create_network_args(dim, dropout, args)
        assert (ours.block_size, ours.block_num, ours.n_butterfly_factor, ours.dropout) == (
            theirs["block_size"], theirs["block_num"], theirs["boft_n_butterfly_factor"], theirs["dropout"]
        )  # fmt: skip
        assert (ours.enable_conv, ours.auto_adjust) == (theirs["enable_conv"], theirs["auto_adjust"])
        for name in ("down_blocks.0.attentions.0.proj_in", "text_model.encoder.layers.0.mlp.fc2"):
            assert ours.builds(name) == pattern_allowed(theirs, name), name


# --- networks.boft refusals ----------------------------------------------------------------------
def test_oft_v2_file_is_refused_for_its_neumann_series(pipe, tmp_path):
    """``OFTv2Module``: ``oft_R.weight`` ``(r, b(b-1)/2)``; its rotation is a truncated Neumann series."""
    path = tmp_path / "oft_v2.safetensors"
    state = {}
    for name, (_, layer) in boft_targets(pipe.unet, "lora_unet", UNET_BLOCKS, False).items():
        state[f"{name}.oft_R.weight"] = 0.01 * torch.randn(in_features(layer) // 4, 6)
    save_file(state, path, metadata={"ss_network_module": "networks.oft_v2"})
    detected = detect_format(path)
    assert (detected.kind, detected.variant) == ("kohya_oft", "networks.oft_v2")
    before = snapshot(pipe)
    with pytest.raises(AdapterFormatError, match="Neumann series") as err:
        load_boft_weights(pipe, path)
    assert str(path) in str(err.value) and "networks.oft_v2" in str(err.value)
    assert_unchanged(pipe, before)


def _boft_variant(pipe, tmp_path, change) -> str:
    state = boft_network_state(pipe, factors=1, enable_conv=False, seed=7)
    path = tmp_path / "variant.safetensors"
    save_file(change(state), path, metadata=boft_metadata(factors=1))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s | {"lora_unet_down_blocks_7_attentions_0_proj_in.boft_R": torch.zeros(1, 8, 4, 4),
                        "lora_unet_down_blocks_7_attentions_0_proj_in.boft_s": torch.ones(32, 1)},
         "down_blocks.7"),
        (lambda s: s | {k: torch.ones(s[k].shape[0] + 2, 1) for k in list(s)[1:2]}, "shape"),
        (lambda s: s | {k: torch.full_like(v, float("inf")) for k, v in list(s.items())[:1]}, "non-finite"),
        (lambda s: s | {"lora_unet_input_blocks_1_1_proj_in.boft_R": torch.zeros(1, 8, 4, 4),
                        "lora_unet_input_blocks_1_1_proj_in.boft_s": torch.ones(32, 1)},
         "SDXL UNet layout"),
        (lambda s: s | {k.replace("boft_s", "alpha"): torch.tensor(1.0) for k in list(s)[1:2]},
         "saves boft_R and boft_s"),
    ],
    ids=["module-not-in-pipeline", "shape", "non-finite", "sdxl-unet-names", "extra-tensor"],
)  # fmt: skip
def test_boft_files_that_do_not_fit_are_refused_and_change_nothing(pipe, tmp_path, change, message):
    path = _boft_variant(pipe, tmp_path, change)
    before = snapshot(pipe)
    with pytest.raises(AdapterFormatError, match=message) as err:
        load_boft_weights(pipe, path)
    assert str(path) in str(err.value)
    assert_unchanged(pipe, before)


def test_write_kohya_adapter_refusals(tmp_path):
    sd = build_tiny_pipeline(weights="random")
    add_boft_to_pipeline(sd, {"unet": BOFTConfig(boft_block_size=4, target_modules=["to_q", "conv_in"])})
    path = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="conv_in: networks.boft adapts only layers inside"):
        write_kohya_adapter(get_boft_adapter(sd), path)
    assert not path.exists()
    unload_boft(sd)
    add_boft_to_pipeline(sd, {"unet": BOFTConfig(boft_block_size=4, bias="boft_only")})
    with pytest.raises(ValueError, match="neither trained biases"):
        write_kohya_adapter(get_boft_adapter(sd), path)
    unload_boft(sd)
    add_boft_to_pipeline(sd, {"unet": BOFTConfig(boft_block_size=4)})
    write_kohya_adapter(get_boft_adapter(sd), path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_kohya_adapter(get_boft_adapter(sd), path)
    write_kohya_adapter(get_boft_adapter(sd), path, overwrite=True, metadata={"ss_output_name": "x"})
    assert read_kohya_network(path).metadata["ss_output_name"] == "x"

    sdxl = build_tiny_sdxl_pipeline()
    add_boft_to_pipeline(
        sdxl, {"unet": BOFTConfig(boft_block_size=4), "text_encoder": BOFTConfig(boft_block_size=4)}
    )
    with pytest.raises(ValueError, match="SDXL UNet layers in the original layout"):
        write_kohya_adapter(get_boft_adapter(sdxl), tmp_path / "sdxl.safetensors", pipe=sdxl)
    assert not (tmp_path / "sdxl.safetensors").exists()
