"""Every YAML in configs/dreambooth/ and configs/memory/: starts with its command, loads into the typed config, fits
its model; the memory configs state their card's budget and use the memory savers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import DREAMBOOTH_FAST

from boft_diffusion.recipes.dreambooth import DreamBoothConfig, run
from boft_diffusion.training.args import ConfigError, config_keys, config_to_dict, field_docs, load_config

REPO = Path(__file__).resolve().parents[1]
MEMORY_CONFIGS = sorted((REPO / "configs" / "memory").glob("*.yaml"))
CONFIGS = sorted((REPO / "configs" / "dreambooth").glob("*.yaml")) + MEMORY_CONFIGS
TINY = [p for p in CONFIGS if p.name.startswith("tiny")]
SD = {"sd15.yaml": (768, [320, 640, 1280]), "sd21.yaml": (1024, [320, 640, 1280])}
"""Text width (CLIP hidden size, also cross-attention input) and UNet attention widths per model."""


def test_the_expected_configs_exist():
    assert {p.name for p in CONFIGS} >= {
        "tiny.yaml",
        "tiny_prior_text_encoder.yaml",
        "sd15.yaml",
        "sd21.yaml",
        "sdxl.yaml",
        "sd35_medium.yaml",
        "flux_dev.yaml",
        "flux2_klein.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_starts_with_its_command_and_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# boft-diffusion train dreambooth --config {path.relative_to(REPO).as_posix()}")
    config = load_config(DreamBoothConfig, path)
    assert isinstance(config, DreamBoothConfig)


def test_tiny_yaml_is_the_default():
    assert load_config(DreamBoothConfig, REPO / "configs/dreambooth/tiny.yaml") == DreamBoothConfig()


@pytest.mark.parametrize("name", sorted(SD))
def test_sd_configs_carry_the_paper_hyperparameters(name):
    config = load_config(DreamBoothConfig, REPO / "configs/dreambooth" / name)
    boft = config.boft
    assert (boft.block_num, boft.block_size, boft.n_butterfly_factor) == (8, 0, 2)
    assert (boft.dropout, boft.bias) == (0.1, "boft_only")
    assert config.optim.learning_rate == 3e-5
    assert boft.unet_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert boft.text_encoder_target_modules == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert config.data.with_prior_preservation and config.data.class_prompt
    assert config.model.pretrained_model_name_or_path


@pytest.mark.parametrize("name", sorted(SD))
def test_sd_block_layout_fits_every_adapted_width(name):
    """UNet projections see the attention widths and (to_k/to_v of cross-attention) the text width;
    CLIP projections see the text width. Every one must split into 8 blocks with 2 butterfly factors."""
    config = load_config(DreamBoothConfig, REPO / "configs/dreambooth" / name)
    text_width, unet_widths = SD[name]
    boft_config = config.boft.to_config(config.boft.unet_target_modules)
    for dim in [*unet_widths, text_width]:
        layout = boft_config.resolve_blocks(dim)
        assert layout.block_num == 8 and layout.block_size * 8 == dim


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.name)
def test_tiny_configs_fit_the_tiny_model_and_run(path, tmp_path):
    fast = [
        f"train.output_dir={tmp_path / 'out'}",
        *DREAMBOOTH_FAST,
        "data.class_inference_steps=2",
        "data.num_class_images=2",
    ]
    result = run(load_config(DreamBoothConfig, path, fast))
    assert result.global_step == 2
    config = load_config(DreamBoothConfig, path)
    if config.boft.train_text_encoder:
        assert any(k.startswith("text_encoder.") for k in result.adapter)


def test_every_key_is_documented():
    docs = field_docs(DreamBoothConfig)
    assert list(docs) == config_keys(DreamBoothConfig)
    undocumented = [key for key, (doc, _) in docs.items() if not doc]
    assert not undocumented


def test_resolved_config_round_trips():
    config = load_config(DreamBoothConfig, None, ["optim.learning_rate=1e-4", "validation.prompts=[a, b]"])
    assert config.optim.learning_rate == 1e-4 and config.validation.prompts == ["a", "b"]
    assert config_to_dict(config)["optim"]["learning_rate"] == 1e-4


# --- errors name the key, the source and the closest valid key ----------------------------------
def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learnig_rate: 1.0e-4\n")
    with pytest.raises(
        ConfigError,
        match=r"'optim.learnig_rate' in config file .*bad.yaml; did you mean 'optim.learning_rate'",
    ):
        load_config(DreamBoothConfig, path)


def test_unknown_section_and_flat_key():
    with pytest.raises(ConfigError, match=r"'optimizer.learning_rate'.*did you mean 'optim.learning_rate'"):
        load_config(DreamBoothConfig, None, ["optimizer.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"'resolution' in command line; did you mean 'data.resolution'"):
        load_config(DreamBoothConfig, None, ["resolution=512"])
    with pytest.raises(ConfigError, match=r"Unknown config key 'zzz'"):
        load_config(DreamBoothConfig, None, ["zzz=1"])


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match=r"'optim.lr_scheduler'"):
        load_config(DreamBoothConfig, None, ["optim.lr_scheduler=cosine_annealing"])
    with pytest.raises(ConfigError, match=r"'train.mixed_precision'"):
        load_config(DreamBoothConfig, None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match=r"'boft.dropout'"):
        load_config(DreamBoothConfig, None, ["boft.dropout=lots"])


def test_invalid_combinations():
    with pytest.raises(ConfigError, match="boft_block_size and boft_block_num"):
        load_config(DreamBoothConfig, None, ["boft.block_num=4"])
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(DreamBoothConfig, None, ["data.resolution=60"])
    with pytest.raises(ConfigError, match="train.train_batch_size must be >= 1"):
        load_config(DreamBoothConfig, None, ["train.train_batch_size=0"])


def test_malformed_sources(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(DreamBoothConfig, None, ["optim.learning_rate"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DreamBoothConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(DreamBoothConfig, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DreamBoothConfig, tmp_path / "broken.yaml")


FAMILY_WIDTHS = {
    # config: (denoiser input widths of the targets, trainable text-encoder widths)
    "sdxl.yaml": ([640, 1280, 2048], [768, 1280]),  # attention widths, text width; CLIP-L, CLIP-G
    "sd35_medium.yaml": ([1536], [768, 1280]),  # MMDiT width (image and text streams); CLIP-L, CLIP-G
    "flux_dev.yaml": ([3072], [768]),  # MMDiT width; CLIP-L (T5 stays frozen)
    "flux2_klein.yaml": ([3072, 12288], []),  # klein 4B: attention / fused width, single to_out; Qwen3 frozen
}


@pytest.mark.parametrize("name", sorted(FAMILY_WIDTHS))
def test_family_configs_carry_the_paper_adapter_and_fit_every_adapted_width(name):
    config = load_config(DreamBoothConfig, REPO / "configs/dreambooth" / name)
    boft = config.boft
    assert (boft.block_num, boft.block_size, boft.n_butterfly_factor, boft.dropout, boft.bias) == (
        8, 0, 2, 0.1, "boft_only",
    )  # fmt: skip
    assert config.model.pretrained_model_name_or_path and config.optim.learning_rate == 1e-4
    denoiser, text = FAMILY_WIDTHS[name]
    layout = boft.to_config(boft.unet_target_modules)
    for dim in [*denoiser, *text]:
        assert layout.resolve_blocks(dim).block_size * 8 == dim
    flow = name != "sdxl.yaml"
    assert config.train.snr_gamma is None  # diffusers' scripts: no Min-SNR
    assert flow or boft.transformer_target_modules is None  # a transformer key on a UNet family is refused


MEMORY_WIDTHS = {
    "sdxl": [640, 1280, 2048],
    "sd35_medium": [1536],
    "flux_dev": [3072],
    "flux2_klein": [3072, 12288],
}
"""The denoiser's adapted input widths per model (the text encoders stay frozen in the memory configs)."""


def test_the_memory_configs_exist():
    expected = {f"{model}_{card}gb.yaml" for model in MEMORY_WIDTHS for card in (24, 16, 12)}
    assert {p.name for p in MEMORY_CONFIGS} == expected


@pytest.mark.parametrize("path", MEMORY_CONFIGS, ids=lambda p: p.name)
def test_memory_configs_state_an_expected_peak_under_their_card_and_use_the_savers(path):
    model, card = path.stem.rsplit("_", 1)
    budget = int(card.removesuffix("gb"))
    header = " ".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"on a {budget} GB card" in header and "EXPECTED (not measured" in header
    peak = float(re.search(r"Peak, EXPECTED \(not measured[^)]*\): about ([\d.]+) GB", header)[1])
    assert 0 < peak < budget
    config = load_config(DreamBoothConfig, path)
    base = load_config(DreamBoothConfig, REPO / "configs/dreambooth" / f"{model}.yaml")
    assert config.model.pretrained_model_name_or_path == base.model.pretrained_model_name_or_path
    assert config.data.resolution == base.data.resolution
    assert config.train.gradient_checkpointing and config.train.mixed_precision == "bf16"
    assert config.train.train_batch_size == 1
    assert config.data.cache_latents and config.data.cache_prompt_embeddings
    assert not config.boft.train_text_encoder
    quantization = config.model.quantization
    assert quantization.backend != "none" or (
        budget > 12 and model != "flux_dev"
    )  # FLUX.1: 24 GB of bf16 weights
    assert config.optim.optimizer == "adamw_8bit" or budget == 24
    layout = config.boft.to_config(config.boft.unet_target_modules)
    for dim in MEMORY_WIDTHS[model]:
        layout.resolve_blocks(dim)  # raises when the blocks do not fit the width
