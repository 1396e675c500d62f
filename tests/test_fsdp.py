"""FSDP: configs/accelerate/fsdp.yaml is a valid accelerate FSDP2 config, and the DreamBooth recipe trains,
saves, resumes and exports under it on two CPU processes (gloo) as under plain data parallelism.

accelerate 1.15 turns a launch into FSDP only on GPUs (on CPU processes it silently runs DDP), so the
worker forces that one selection; the sharding itself is accelerate's ``fully_shard`` path unchanged.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from boft_diffusion.io import read_adapter

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"


def test_fsdp_config_loads_with_accelerate_and_names_known_flags():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(CONFIG))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2  # FSDP1 flattens parameters: refused by the recipes
    assert fsdp["fsdp_reshard_after_forward"] is True
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # each denoiser's own _no_split_modules
    flags = {a.dest for a in launch_command_parser()._actions}
    unknown = [key for key in fsdp if key not in flags]  # launch maps fsdp_config.x to --x
    assert not unknown, unknown
    assert CONFIG.read_text().startswith("# accelerate launch --config_file configs/accelerate/fsdp.yaml")


@pytest.mark.parametrize("key", ["fsdp_auto_wrap_policy", "fsdp_state_dict_type"])
def test_fsdp_config_values_are_accelerate_choices(key):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.constants import FSDP_AUTO_WRAP_POLICY, FSDP_BACKWARD_PREFETCH, FSDP_STATE_DICT_TYPE

    choices = {
        "fsdp_auto_wrap_policy": FSDP_AUTO_WRAP_POLICY,
        "fsdp_backward_prefetch": FSDP_BACKWARD_PREFETCH,
        "fsdp_state_dict_type": FSDP_STATE_DICT_TYPE,
    }[key]
    assert load_config_from_file(str(CONFIG)).fsdp_config[key] in choices


# --- FSDP2 on two CPU processes -------------------------------------------------------------------
WORKER = """
import os, sys, torch
from accelerate import FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType
import boft_diffusion.training.recipe as recipe_module
from boft_diffusion.inject import boft_layers
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, DreamBoothRecipe
from boft_diffusion.training.args import load_config

make_accelerator = recipe_module.make_accelerator


def forced(train):
    # accelerate 1.15 selects FSDP only for GPU processes; on CPU it would run DDP. Everything after this
    # selection (fully_shard through accelerate.prepare, FSDP2's gloo collectives) is accelerate's and torch's.
    accelerator = make_accelerator(train)
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState() copies it back from here
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
    return accelerator


recipe_module.make_accelerator = forced
out, name, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
recipe = DreamBoothRecipe(load_config(DreamBoothConfig, None, [f"train.output_dir={out}/{name}", *overrides]))
result = recipe.run()
state = PartialState()  # after the run: its accelerator set it up (gloo on CPU)
kinds = sorted({type(p).__name__ for p in recipe.pipe.transformer.parameters() if p.requires_grad})  # BOFT
cached = sorted({layer.cache_rotations for layer in boft_layers(recipe.pipe.transformer).values()})
torch.save(
    {
        "adapter": result.adapter, "losses": result.losses, "type": str(state.distributed_type), "kinds": kinds,
        "cached": cached,
    },
    f"{out}/{name}-rank{state.process_index}.pt",
)
"""

TINY_FLUX = [
    "model.tiny_family=flux",
    "model.tiny_weights=random",
    "train.max_train_steps=3",
    "train.checkpointing_steps=2",
    "validation.validation_steps=2",
    "validation.num_inference_steps=2",
    "validation.num_images_per_prompt=1",
    "data.num_generated_images=4",
    "data.with_prior_preservation=false",
    "metrics.scorer=none",
    "train.report_to=none",
    "boft.train_text_encoder=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, launcher: list[str], name: str, *overrides: str) -> subprocess.CompletedProcess:
    """Two CPU processes running the worker: DreamBooth into ``out/name``."""
    script = out / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script), str(out), name, *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


def _train(out: Path, launcher: list[str], name: str, *overrides: str) -> list[dict]:
    proc = _launch(out, launcher, name, *TINY_FLUX, *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"{name}-rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.slow
def test_fsdp2_trains_saves_resumes_and_exports_as_data_parallel_training_does(tmp_path):
    """Tiny Flux DreamBooth, two CPU processes under accelerate's FSDP2 (the config file above): the
    denoiser's parameters are sharded, and yet the saved adapter, checkpoint, validation grid and merged
    export are those of the same run under plain data parallelism; a resume from the sharded checkpoint
    ends where the uninterrupted run did."""
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    fsdp.mkdir()
    ddp.mkdir()
    sharded = _train(fsdp, ["--config_file", str(CONFIG)], "run", "train.export_merged=true")
    plain = _train(ddp, ["--multi_gpu"], "run")
    assert "FSDP" in sharded[0]["type"] and "MULTI_CPU" in plain[0]["type"]
    assert sharded[0]["kinds"] == ["DTensor"] and plain[0]["kinds"] == ["Parameter"]  # BOFT tensors sharded
    assert sharded[0]["cached"] == [False] and plain[0]["cached"] == [True]  # no rotation reuse under FSDP
    run, reference = sharded[0], plain[0]
    assert len(run["losses"]) == 3
    torch.testing.assert_close(
        torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6
    )
    assert set(run["adapter"]) == set(reference["adapter"]) and run["adapter"]
    for key, value in run["adapter"].items():
        assert torch.equal(value, sharded[1]["adapter"][key]), key  # every process gets the whole tensor
        torch.testing.assert_close(value, reference["adapter"][key], rtol=1e-5, atol=1e-6)
        assert not torch.equal(value, torch.zeros_like(value)) or "boft_s" in key
    saved = read_adapter(fsdp / "run")
    assert saved.metadata["family"] == "flux"
    for key, value in saved.tensors["transformer"].items():
        assert torch.equal(value, run["adapter"][f"transformer.{key}"]), key
    ckpt = read_adapter(fsdp / "run" / "checkpoint-2").tensors["transformer"]
    ckpt_ddp = read_adapter(ddp / "run" / "checkpoint-2").tensors["transformer"]
    for key, value in ckpt.items():
        torch.testing.assert_close(value, ckpt_ddp[key], rtol=1e-5, atol=1e-6)
    assert (fsdp / "run" / "validation" / "step-000002.png").is_file()
    merged = FluxPipeline.from_pretrained(
        fsdp / "run" / "merged"
    )  # merged from a whole copy on the main process
    assert merged.transformer.config.num_layers == 1
    resume = f"train.resume_from_checkpoint={fsdp / 'run' / 'checkpoint-2'}"
    resumed = _train(fsdp, ["--config_file", str(CONFIG)], "resumed", resume)[0]
    assert len(resumed["losses"]) == 1
    torch.testing.assert_close(resumed["losses"][0], run["losses"][2], rtol=1e-5, atol=1e-6)
    for key, value in resumed["adapter"].items():
        torch.testing.assert_close(value, run["adapter"][key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_refuses_a_second_trained_model_before_writing(tmp_path):
    flags = [o for o in TINY_FLUX if not o.startswith("boft.train_text_encoder")]
    proc = _launch(tmp_path, ["--config_file", str(CONFIG)], "run", *flags, "boft.train_text_encoder=true")
    assert proc.returncode != 0
    assert (
        "Under FSDP the DreamBooth recipe trains one model, and this run trains 2 (transformer, text_encoder)"
        in (proc.stderr)
    )
    assert not (tmp_path / "run" / "boft_weights.safetensors").exists()


@pytest.mark.parametrize(
    ("kind", "version", "components", "unsupported", "message"),
    [
        ("DEEPSPEED", None, ["unet"], None, "DeepSpeed is not supported by the training recipes"),
        ("FSDP", 1, ["unet"], None, "FSDP version 1 is not supported: it flattens"),
        ("FSDP", 2, ["unet", "text_encoder"], None, "trains 2 (unet, text_encoder)"),
        (
            "FSDP",
            2,
            ["controlnet"],
            "reads it whole",
            "The ControlNet recipe cannot run under FSDP: reads it whole",
        ),
    ],
)
def test_sharding_setups_the_recipes_cannot_save_are_refused(kind, version, components, unsupported, message):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from boft_diffusion.training.args import ConfigError
    from boft_diffusion.training.sharding import check_sharding

    plugin = SimpleNamespace(fsdp_version=version)
    accelerator = SimpleNamespace(
        distributed_type=DistributedType[kind], state=SimpleNamespace(fsdp_plugin=plugin)
    )
    recipe = "ControlNet" if unsupported else "DreamBooth"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_sharding(accelerator, dict.fromkeys(components), recipe, unsupported)
    ok = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)),
    )
    check_sharding(ok, {"unet": None}, "DreamBooth")  # FSDP2, one model: accepted
