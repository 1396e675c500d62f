"""configs/accelerate/fsdp.yaml is a valid accelerate FSDP config (checked against accelerate's own loader).

FSDP itself cannot run in this test suite: accelerate 1.15 only turns a launch into FSDP on GPUs; on
CPU processes (gloo) it either refuses (sync_module_states needs a GPU device) or silently runs DDP.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"


def test_fsdp_config_loads_with_accelerate_and_names_known_flags():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(CONFIG))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_use_orig_params"] is True  # frozen base + trained BOFT params in one unit
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_sharding_strategy"] in ("FULL_SHARD", "SHARD_GRAD_OP")
    flags = {a.dest for a in launch_command_parser()._actions}
    unknown = [key for key in fsdp if key not in flags]  # launch maps fsdp_config.x to --x
    assert not unknown, unknown
    assert CONFIG.read_text().startswith("# accelerate launch --config_file configs/accelerate/fsdp.yaml")


@pytest.mark.parametrize("key", ["fsdp_auto_wrap_policy", "fsdp_backward_prefetch", "fsdp_state_dict_type"])
def test_fsdp_config_values_are_accelerate_choices(key):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.constants import FSDP_AUTO_WRAP_POLICY, FSDP_BACKWARD_PREFETCH, FSDP_STATE_DICT_TYPE

    choices = {
        "fsdp_auto_wrap_policy": FSDP_AUTO_WRAP_POLICY,
        "fsdp_backward_prefetch": FSDP_BACKWARD_PREFETCH,
        "fsdp_state_dict_type": FSDP_STATE_DICT_TYPE,
    }[key]
    assert load_config_from_file(str(CONFIG)).fsdp_config[key] in choices
