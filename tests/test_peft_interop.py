"""PEFT interop on the tiny pipeline: PEFT BOFT adapters load here, adapters saved here load in PEFT.

On CPU PEFT runs one butterfly factor only (its multi-factor path needs a CUDA extension), so image
equivalence is tested with one factor and factors > 1 are checked at the tensor level (and against
PEFT's own dense construction of the rotation). Measured: max abs image difference ~1e-6.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import sample_images
from safetensors.torch import load_file, save_file

from boft_diffusion import (
    AdapterFormatError,
    BOFTConfig,
    add_boft_to_pipeline,
    load_boft_weights,
    save_peft_adapter,
)
from boft_diffusion.functional import pack_skew
from boft_diffusion.inject import adapter_configs, boft_layers
from boft_diffusion.io import is_peft_adapter, read_peft_adapter
from boft_diffusion.tiny import build_tiny_pipeline

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT: "Failed to load the CUDA extension"

IMAGE_TOLERANCE = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def fresh_pipe():
    return build_tiny_pipeline(seed=0)


def perturb_biases(layers) -> None:
    """Trained-looking biases: PEFT trains the base layer's bias, this project the adapter's own copy."""
    with torch.no_grad():
        for layer in layers:
            biases = layer.boft_bias.values() if hasattr(layer, "boft_bias") else [layer.base_layer.bias]
            for bias in biases:
                if bias is not None:
                    bias.add_(0.05 * torch.randn_like(bias))


@pytest.fixture(scope="module")
def peft_dreambooth(tmp_path_factory):
    """PEFT's DreamBooth layout: ``unet/`` (block number 4: block sizes 8 and 16) + ``text_encoder/``."""
    root = tmp_path_factory.mktemp("peft") / "dreambooth"
    pipe = fresh_pipe()
    torch.manual_seed(0)
    unet_config = peft.BOFTConfig(
        boft_block_size=0, boft_block_num=4, target_modules=UNET_TARGETS, init_weights=False
    )
    text_config = peft.BOFTConfig(
        boft_block_size=4, target_modules=TEXT_TARGETS, init_weights=False, bias="boft_only"
    )
    unet = peft.get_peft_model(pipe.unet, unet_config)
    text = peft.get_peft_model(pipe.text_encoder, text_config)
    perturb_biases(m for m in pipe.text_encoder.modules() if isinstance(m, peft.tuners.boft.layer.Linear))
    reference = sample_images(pipe)
    unet.save_pretrained(root / "unet")
    text.save_pretrained(root / "text_encoder")
    return root, reference


def test_peft_dreambooth_folder_loads_with_identical_images(peft_dreambooth):
    root, reference = peft_dreambooth
    assert is_peft_adapter(root)
    pipe = fresh_pipe()
    assert load_boft_weights(pipe, root) == "default"
    configs = {c: adapter_configs(getattr(pipe, c))["default"] for c in ("unet", "text_encoder")}
    assert configs["unet"].boft_block_num == 4 and configs["unet"].boft_block_size == 0
    assert configs["text_encoder"].bias == "boft_only"
    assert {layer.layouts["default"].block_size for layer in boft_layers(pipe.unet).values()} == {8, 16}
    images = sample_images(pipe)
    assert np.abs(images - sample_images(fresh_pipe())).max() > 0.01
    assert np.abs(images - reference).max() < IMAGE_TOLERANCE


@pytest.mark.parametrize("which", ["unet", "text_encoder", "unet/adapter_config.json"])
def test_single_model_peft_folder(peft_dreambooth, which):
    root, _ = peft_dreambooth
    component = which.partition("/")[0]
    pipe = fresh_pipe()
    load_boft_weights(pipe, root / which, adapter_name="single")
    adapted = {c for c in ("unet", "text_encoder") if adapter_configs(getattr(pipe, c))}
    assert adapted == {component}
    peft_tensors = load_file(root / component / "adapter_model.safetensors")
    for name, layer in boft_layers(getattr(pipe, component)).items():
        generator = peft_tensors[f"base_model.model.{name}.boft_R"]
        assert torch.equal(layer.boft_R["single"].detach(), pack_skew(generator))
        assert torch.equal(
            layer.boft_s["single"].detach(), peft_tensors[f"base_model.model.{name}.boft_s"].flatten()
        )


def test_export_to_peft_loads_in_peft_with_identical_images(tmp_path):
    pipe = fresh_pipe()
    torch.manual_seed(1)
    add_boft_to_pipeline(
        pipe,
        {
            "unet": BOFTConfig(boft_block_size=8, init_weights=False),
            "text_encoder": BOFTConfig(boft_block_size=4, init_weights=False, bias="boft_only"),
        },
        "mine",
    )
    perturb_biases(boft_layers(pipe.text_encoder).values())
    reference = sample_images(pipe)
    save_peft_adapter(pipe, tmp_path / "out", adapter_name="mine")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["text_encoder", "unet"]
    target = fresh_pipe()
    peft.PeftModel.from_pretrained(target.unet, tmp_path / "out" / "unet")
    peft.PeftModel.from_pretrained(target.text_encoder, tmp_path / "out" / "text_encoder")
    assert isinstance(
        target.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q, peft.tuners.boft.layer.Linear
    )
    assert np.abs(sample_images(target) - reference).max() < IMAGE_TOLERANCE


def test_butterfly_factors_round_trip_at_tensor_level(tmp_path):
    """m = 2: ours -> PEFT files -> ours is exact, and PEFT's dense construction gives our merged weight."""
    from peft.tuners.boft.layer import BOFTLayer as PeftLayer

    pipe = fresh_pipe()
    torch.manual_seed(2)
    add_boft_to_pipeline(
        pipe, {"unet": BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)}
    )
    reference = sample_images(pipe)
    save_peft_adapter(pipe, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOFT" and config["boft_n_butterfly_factor"] == 2
    stored = load_file(tmp_path / "peft" / "unet" / "adapter_model.safetensors")

    name, layer = next(iter(boft_layers(pipe.unet).items()))
    generator, scale = stored[f"base_model.model.{name}.boft_R"], stored[f"base_model.model.{name}.boft_s"]
    m, r, b, _ = generator.shape
    assert (m, b) == (2, 4) and scale.shape == (layer.out_features, 1)
    assert torch.equal(generator, -generator.transpose(-1, -2))  # PEFT's A holds the skew Q itself
    # PEFT's get_delta_weight, spelled out: F_i = P_i blockdiag(Cayley(A_i)) P_i^T, M = F_1 F_0
    d = layer.rotation_dim
    blocks = PeftLayer.cayley_batch(None, generator.view(m * r, b, b)).view(m, r, b, b)
    factors = []
    for i in range(m):
        perm = PeftLayer.block_butterfly_perm(None, d, r // 2**i, b // 2, m - 1)
        p = PeftLayer.perm2mat(None, perm)
        factors.append(p @ torch.block_diag(*blocks[i]) @ p.T)
    rotation = factors[1] @ factors[0]
    peft_weight = (rotation @ layer.weight_rows().T).T * scale
    torch.testing.assert_close(layer.rotated_weight_rows(["default"]), peft_weight, rtol=1e-5, atol=1e-6)

    back = read_peft_adapter(tmp_path / "peft")
    for key, tensor in back.tensors["unet"].items():
        path, _, leaf = key.rpartition(".")
        assert torch.equal(tensor, getattr(boft_layers(pipe.unet)[path], leaf)["default"].detach()), key
    again = fresh_pipe()
    load_boft_weights(again, tmp_path / "peft")
    assert np.array_equal(sample_images(again), reference)


# --- refusals ----------------------------------------------------------------------------------
def assert_untouched(pipe) -> None:
    assert not boft_layers(pipe.unet) and not boft_layers(pipe.text_encoder)


def write_peft(folder, config: dict, tensors: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")


def test_lora_adapter_is_refused(tmp_path):
    pipe = fresh_pipe()
    lora = peft.get_peft_model(pipe.unet, peft.LoraConfig(r=4, target_modules=["to_q"]))
    lora.save_pretrained(tmp_path / "lora")
    target = fresh_pipe()
    with pytest.raises(AdapterFormatError, match="LORA adapter, not BOFT"):
        load_boft_weights(target, tmp_path / "lora")
    assert_untouched(target)


def test_one_bad_component_refuses_the_whole_dreambooth_folder(peft_dreambooth, tmp_path):
    root, _ = peft_dreambooth
    shutil.copytree(root / "unet", tmp_path / "db" / "unet")
    (tmp_path / "db" / "text_encoder").mkdir()
    shutil.copy(root / "text_encoder" / "adapter_config.json", tmp_path / "db" / "text_encoder")
    data = (root / "text_encoder" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "db" / "text_encoder" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    pipe = fresh_pipe()
    with pytest.raises(AdapterFormatError, match="not a readable safetensors file"):
        load_boft_weights(pipe, tmp_path / "db")
    assert_untouched(pipe)


def test_pickle_only_adapter_is_refused(peft_dreambooth, tmp_path):
    root, _ = peft_dreambooth
    (tmp_path / "bin").mkdir()
    shutil.copy(root / "unet" / "adapter_config.json", tmp_path / "bin")
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterFormatError, match="pickle files are not read"):
        load_boft_weights(fresh_pipe(), tmp_path / "bin")


def test_unknown_tensor_kind_is_refused(peft_dreambooth, tmp_path):
    root, _ = peft_dreambooth
    tensors = load_file(root / "unet" / "adapter_model.safetensors")
    tensors["base_model.model.conv_in.lora_A.weight"] = torch.zeros(4, 4)
    config = json.loads((root / "unet" / "adapter_config.json").read_text())
    write_peft(tmp_path / "odd", config, tensors)
    with pytest.raises(AdapterFormatError, match="cannot be represented"):
        load_boft_weights(fresh_pipe(), tmp_path / "odd")


def test_layers_sharing_no_layout_are_refused(tmp_path):
    prefix = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {
        f"{prefix}.to_q.boft_R": torch.zeros(1, 8, 4, 4),
        f"{prefix}.to_q.boft_s": torch.ones(32, 1),
        f"{prefix}.to_k.boft_R": torch.zeros(1, 2, 16, 16),
        f"{prefix}.to_k.boft_s": torch.ones(32, 1),
    }
    write_peft(tmp_path / "mixed", {"peft_type": "BOFT", "target_modules": ["to_q", "to_k"]}, tensors)
    with pytest.raises(AdapterFormatError, match="neither a block size"):
        load_boft_weights(fresh_pipe(), tmp_path / "mixed")


def test_adapter_for_another_base_is_refused(peft_dreambooth, tmp_path):
    root, _ = peft_dreambooth
    tensors = load_file(root / "unet" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith(".boft_s"))
    tensors[key] = torch.ones(48, 1)  # a projection of another width
    write_peft(tmp_path / "other", json.loads((root / "unet" / "adapter_config.json").read_text()), tensors)
    pipe = fresh_pipe()
    with pytest.raises(AdapterFormatError, match="shape"):
        load_boft_weights(pipe, tmp_path / "other")
    assert_untouched(pipe)


def test_factor_count_comes_from_the_weights(peft_dreambooth, tmp_path):
    """PEFT without CUDA writes config boft_n_butterfly_factor=2 but trains one factor."""
    root, reference = peft_dreambooth
    shutil.copytree(root, tmp_path / "db")
    for comp in ("unet", "text_encoder"):
        file = tmp_path / "db" / comp / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), "boft_n_butterfly_factor": 2}))
    pipe = fresh_pipe()
    with pytest.warns(UserWarning, match="the weights hold 1 factor"):
        load_boft_weights(pipe, tmp_path / "db")
    assert np.abs(sample_images(pipe) - reference).max() < IMAGE_TOLERANCE


def test_save_peft_adapter_refuses_existing_folders(tmp_path):
    pipe = fresh_pipe()
    add_boft_to_pipeline(pipe, {"unet": BOFTConfig(boft_block_size=4)})
    (tmp_path / "out" / "unet").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        save_peft_adapter(pipe, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "unet"]
    assert list((tmp_path / "out" / "unet").iterdir()) == []
