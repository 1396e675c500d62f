"""BOFTConfig: PEFT defaults, validation messages, JSON round trip."""

from __future__ import annotations

import pytest

from boft_diffusion import BOFTConfig


def test_defaults_match_peft():
    config = BOFTConfig()
    assert (config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor) == (4, 0, 1)
    assert config.target_modules is None and config.boft_dropout == 0.0 and config.bias == "none"
    assert config.fan_in_fan_out is False and config.init_weights is True and config.modules_to_save is None
    assert config.layers_to_transform is None and config.layers_pattern is None
    peft = pytest.importorskip("peft")
    theirs = peft.BOFTConfig()
    for name in BOFTConfig.field_names():
        assert getattr(theirs, name) == getattr(config, name), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boft_block_size": 4, "boft_block_num": 2}, "exactly one of boft_block_size and boft_block_num"),
        ({"boft_block_size": 0, "boft_block_num": 0}, "exactly one of boft_block_size and boft_block_num"),
        ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor must be an integer >= 1"),
        ({"boft_dropout": 1.5}, "boft_dropout must be in"),
        ({"bias": "lora_only"}, "bias must be one of"),
        ({"layers_pattern": "layers"}, "layers_pattern is only meaningful"),
    ],
)
def test_invalid_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BOFTConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "dim", "message"),
    [
        ({"boft_block_size": 6}, 32, "input dim 32 is not divisible by boft_block_size=6"),
        ({"boft_block_size": 0, "boft_block_num": 5}, 32, "not divisible by boft_block_num=5"),
        (
            {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 4},
            32,
            "too large for boft_block_num=4",
        ),
        ({"boft_block_size": 8, "boft_n_butterfly_factor": 3}, 48, r"multiple of 8 \* 2\^2 = 32"),
        ({"boft_block_size": 3, "boft_n_butterfly_factor": 2}, 12, "even block size and block number"),
    ],
)
def test_layer_rules_name_layer_and_numbers(kwargs, dim, message):
    with pytest.raises(ValueError, match=message) as err:
        BOFTConfig(**kwargs).resolve_blocks(dim, "down_blocks.0.attn1.to_q")
    assert "down_blocks.0.attn1.to_q" in str(err.value)


def test_resolve_blocks():
    layout = BOFTConfig(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2).resolve_blocks(320)
    assert (layout.block_size, layout.block_num, layout.n_factors) == (40, 8, 2)


def test_json_round_trip_and_unknown_key():
    config = BOFTConfig(
        boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["to_q"], bias="boft_only"
    )
    assert BOFTConfig.from_json_string(config.to_json_string()) == config
    with pytest.raises(
        ValueError, match="Unknown BOFTConfig key 'boft_blok_size'; did you mean 'boft_block_size'"
    ):
        BOFTConfig.from_dict({"boft_blok_size": 4})
