"""Checkpoints: loading never runs code, a resume is exact or refused, a diverging, interrupted or
out-of-disk run keeps its last good checkpoint and says so in one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DREAMBOOTH_FAST, recipe_config
from torch import nn

from boft_diffusion import cli
from boft_diffusion.io import format as adapter_format
from boft_diffusion.io import read_adapter
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, DreamBoothRecipe, run
from boft_diffusion.training import checkpoint as checkpoint_module
from boft_diffusion.training.args import ConfigError
from boft_diffusion.training.checkpoint import CHECKPOINT_MARKER, latest_checkpoint, list_checkpoints
from boft_diffusion.training.setup import RUN_CONFIG_NAME

FAST = [*DREAMBOOTH_FAST, "train.checkpointing_steps=1", "validation.num_inference_steps=1"]
SOURCE = ["optim.lr_scheduler=cosine", "optim.lr_warmup_steps=1"]
"""The source run's schedule: it decays over train.max_train_steps."""


def make_config(out: Path, *overrides: str) -> DreamBoothConfig:
    return recipe_config(DreamBoothConfig, out, *FAST, *overrides)


def cli_train(out: Path, *overrides: str) -> int:
    return cli.main(["train", "dreambooth", f"train.output_dir={out}", *FAST, *overrides])


def last_line(text: str) -> str:
    return text.replace("\r", "\n").strip().splitlines()[-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoint-1 and checkpoint-2 (tests work on copies)."""
    out = tmp_path_factory.mktemp("source") / "run"
    run(make_config(out, *SOURCE))
    return out


@pytest.fixture
def out(source, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(source, copy)
    return copy


# --- 1. no code runs from a checkpoint --------------------------------------------------------------
class Planted:
    """A pickle that, when loaded, creates the file ``marker`` (stands in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


ACCELERATE_FILES = [
    "custom_checkpoint_0.pkl",
    "random_states_0.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "sampler.bin",
    "scaler.pt",
    "dl_state_dict.bin",
    "pytorch_model.bin",
]
"""Every file name accelerate's load_state would unpickle."""


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Planted(marker)))


@pytest.mark.parametrize("planted", [["custom_checkpoint_0.pkl"], ACCELERATE_FILES], ids=["custom", "all"])
def test_pickles_planted_in_a_checkpoint_never_run(out, tmp_path, planted):
    marker = tmp_path / "code-ran"
    for name in planted:
        plant(out / "checkpoint-1" / name, marker)
    result = run(make_config(out, *SOURCE, "train.resume_from_checkpoint=checkpoint-1"))
    assert not marker.exists()
    assert result.global_step == 2 and len(result.losses) == 1


def _rehash(folder: Path, name: str) -> None:
    """Make the marker vouch for the current bytes of ``name`` (as a careful attacker would)."""
    marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    data = (folder / name).read_bytes()
    marker["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "name",
    ["optimizer.safetensors", "rng_state_0.safetensors", "boft_weights.safetensors", CHECKPOINT_MARKER],
)
def test_a_pickle_in_place_of_a_checkpoint_file_is_refused_unread(out, tmp_path, name):
    marker, folder = tmp_path / "code-ran", out / "checkpoint-1"
    plant(folder / name, marker)
    if name != CHECKPOINT_MARKER:
        _rehash(folder, name)
    cfg = make_config(out, *SOURCE, "train.resume_from_checkpoint=checkpoint-1")
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        checkpoint_module.check_resume(folder, cfg)
    if name == "optimizer.safetensors":  # the run refuses it too
        with pytest.raises(ConfigError, match=name):
            run(cfg)
    assert not marker.exists()


def test_a_checkpoint_of_accelerate_pickles_is_refused(out, tmp_path):
    folder, marker = out / "checkpoint-1", tmp_path / "code-ran"
    for path in folder.iterdir():
        path.unlink()
    for name in ACCELERATE_FILES:
        plant(folder / name, marker)
    (folder / CHECKPOINT_MARKER).write_text(json.dumps({"step": 1}))  # the earlier marker
    cfg = make_config(out, *SOURCE, "train.resume_from_checkpoint=checkpoint-1")
    with pytest.raises(ConfigError, match="earlier boft-diffusion.*never loaded"):
        checkpoint_module.check_resume(folder, cfg)
    assert not marker.exists()


# --- 2. a resume is exact or refused --------------------------------------------------------------
def test_a_resume_with_another_learning_rate_is_refused(out):
    cfg = make_config(out, *SOURCE, "optim.learning_rate=0.02", "train.resume_from_checkpoint=latest")
    saved_config = (out / RUN_CONFIG_NAME).read_text()
    with pytest.raises(
        ConfigError, match=r"optim\.learning_rate=0\.002, this run has optim\.learning_rate=0\.02"
    ):
        run(cfg)
    assert (out / RUN_CONFIG_NAME).read_text() == saved_config  # the refused config is not recorded
    assert latest_checkpoint(out) == out / "checkpoint-2"


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ("optim.learning_rate=0.02", True),
        ("optim.lr_scheduler=constant", True),
        ("optim.lr_warmup_steps=0", True),
        ("train.max_train_steps=4", True),  # cosine decays over the run's length
        ("optim.adam_beta2=0.99", True),
        ("train.gradient_accumulation_steps=2", True),
        ("train.seed=1", True),
        ("boft.block_num=2", True),
        ("optim.max_grad_norm=0.5", False),  # read every step: the new value applies
        ("boft.dropout=0.0", False),
        ("validation.num_inference_steps=2", False),
    ],
)
def test_check_resume_refuses_what_the_saved_state_would_override(source, override, refused):
    key = override.split("=")[0]
    cfg = make_config(source, *SOURCE, override, "train.resume_from_checkpoint=latest")
    if refused:
        with pytest.raises(ConfigError, match=rf"was saved with {key}=.*this run has {key}="):
            checkpoint_module.check_resume(source / "checkpoint-2", cfg)
    else:
        checkpoint_module.check_resume(source / "checkpoint-2", cfg)


def test_a_constant_schedule_may_be_extended_but_not_with_other_processes(tmp_path, monkeypatch):
    """``constant`` does not depend on the run's length; the process count always matters."""
    run_dir = tmp_path / "constant"
    run(make_config(run_dir, "train.max_train_steps=1"))
    cfg = make_config(run_dir, "train.max_train_steps=9")
    checkpoint_module.check_resume(run_dir / "checkpoint-1", cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="saved by 1 processes, this run has 2"):
        checkpoint_module.check_resume(run_dir / "checkpoint-1", cfg)


def _rng_file(folder: Path) -> Path:
    """The random-state file of process 0 (whatever its name in this version)."""
    return next(p for p in folder.iterdir() if "random" in p.name or "rng" in p.name)


def _optimizer_file(folder: Path) -> Path:
    return next(p for p in folder.iterdir() if p.name.startswith("optimizer"))


@pytest.mark.parametrize("find", [_rng_file, _optimizer_file], ids=["rng", "optimizer"])
def test_a_resume_with_a_missing_state_file_is_refused(out, find):
    missing = find(out / "checkpoint-1")
    missing.unlink()
    with pytest.raises(ConfigError, match=missing.name.replace(".", r"\.")):
        run(make_config(out, *SOURCE, "train.resume_from_checkpoint=checkpoint-1"))


DAMAGED = [
    (name, damage)
    for name in ["optimizer.safetensors", "rng_state_0.safetensors", "boft_weights.safetensors"]
    for damage in ["missing", "truncated", "flipped"]
] + [(CHECKPOINT_MARKER, "missing"), (CHECKPOINT_MARKER, "truncated")]


@pytest.mark.parametrize(("name", "damage"), DAMAGED)
def test_check_resume_names_a_missing_or_corrupt_file(out, name, damage):
    path = out / "checkpoint-2" / name
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    cfg = make_config(out, *SOURCE, "train.resume_from_checkpoint=latest")
    if name == CHECKPOINT_MARKER and damage == "missing":
        assert latest_checkpoint(out) == out / "checkpoint-1"  # `latest` skips incomplete ones
        checkpoint_module.check_resume(latest_checkpoint(out), cfg)
        return
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        checkpoint_module.check_resume(out / "checkpoint-2", cfg)


@pytest.mark.parametrize("target", ["file", "folder"])
def test_a_listed_name_that_links_out_of_the_checkpoint_is_refused_unread(out, tmp_path, target):
    """The marker names files of the checkpoint; a link among them never makes the resume read elsewhere,
    even when the size and hash the marker lists are the outside file's own."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text('{"not": "a checkpoint file"}')
    folder = out / "checkpoint-2"
    link = folder / "notes.json" if target == "file" else folder / "notes"
    link.symlink_to(outside / "secret.json" if target == "file" else outside)
    name = "notes.json" if target == "file" else "notes/secret.json"
    marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    data = (outside / "secret.json").read_bytes()
    marker["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    cfg = make_config(out, *SOURCE, "train.resume_from_checkpoint=latest")
    with pytest.raises(ConfigError, match=f"lists '{name}', a path outside the checkpoint"):
        checkpoint_module.check_resume(folder, cfg)


# --- 3. a diverging run stops, keeping the last finite checkpoint ---------------------------------
def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = DreamBoothRecipe.compute_loss

    def nan_from_step_3(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.step >= 2 else loss

    monkeypatch.setattr(DreamBoothRecipe, "compute_loss", nan_from_step_3)
    code = cli_train(
        out, "train.max_train_steps=4", "train.checkpoints_total_limit=1", "validation.validation_steps=1"
    )
    line = last_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("error: ") and "step 3" in line and "loss is nan" in line

    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-2"]
    kept = read_adapter(out / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in kept.tensors["unet"].values())
    assert not (out / "boft_weights.safetensors").exists()  # no final adapter
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000001.png", "step-000002.png"]

    monkeypatch.setattr(DreamBoothRecipe, "compute_loss", original)
    result = run(
        make_config(
            out,
            "train.max_train_steps=4",
            "train.checkpoints_total_limit=1",
            "train.resume_from_checkpoint=latest",
        )
    )
    assert result.global_step == 4 and len(result.losses) == 2


def test_a_huge_learning_rate_is_stopped_before_anything_non_finite_is_saved(tmp_path):
    from boft_diffusion.training.loop import TrainingDiverged

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"Training diverged at step \d+"):
        run(
            make_config(
                out, "optim.learning_rate=1e30", "optim.max_grad_norm=null", "train.max_train_steps=6"
            )
        )
    assert not (out / "boft_weights.safetensors").exists()
    for _, folder in list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in read_adapter(folder).tensors["unet"].values())


def _tiny_state(tmp_path: Path, seed: int = 0):
    from boft_diffusion import BOFTConfig, add_boft
    from boft_diffusion.training.args import TrainArgs
    from boft_diffusion.training.checkpoint import TrainingState, TrainProgress
    from boft_diffusion.training.setup import make_accelerator

    torch.manual_seed(seed)
    accelerator = make_accelerator(TrainArgs(output_dir=str(tmp_path), report_to="none"))
    model = add_boft(nn.Sequential(nn.Linear(8, 8)), BOFTConfig(boft_block_size=4, target_modules=["0"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(2):
        model(torch.randn(3, 8)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    state = TrainingState({"unet": model}, optimizer, scheduler, TrainProgress(), config={"train.seed": 0})
    return accelerator, state, params


def test_save_checkpoint_refuses_a_non_finite_adapter_and_prunes_nothing(tmp_path):
    from boft_diffusion.training.checkpoint import prune_checkpoints, save_checkpoint
    from boft_diffusion.training.loop import TrainingDiverged

    accelerator, state, params = _tiny_state(tmp_path)
    good = save_checkpoint(accelerator, state, tmp_path, 1)
    with torch.no_grad():
        params[0].view(-1)[0] = float("inf")
    with pytest.raises(
        TrainingDiverged, match=r"checkpoint-2: the adapter tensor unet\.0\.\S+ is NaN or inf"
    ):
        save_checkpoint(accelerator, state, tmp_path, 2)
    assert [p for _, p in list_checkpoints(tmp_path)] == [good]
    assert not list(tmp_path.glob(".checkpoint-*"))
    assert prune_checkpoints(tmp_path, good, 1) == []


def test_save_and_load_restore_optimiser_schedule_step_and_random_state_exactly(tmp_path):
    from boft_diffusion.training.checkpoint import load_checkpoint, save_checkpoint

    accelerator, state, params = _tiny_state(tmp_path)
    state.progress.step = 2
    folder = save_checkpoint(accelerator, state, tmp_path, 2)
    expected = (torch.rand(4), [p.detach().clone() for p in params], state.optimizer.state_dict())
    schedule = state.lr_scheduler.state_dict()

    accelerator, fresh, fresh_params = _tiny_state(tmp_path, seed=1)  # other weights and optimiser state
    assert not torch.equal(fresh_params[0], expected[1][0])
    load_checkpoint(accelerator, folder, fresh)
    assert torch.equal(torch.rand(4), expected[0])  # the draws continue as after the save
    assert all(torch.equal(a, b) for a, b in zip(fresh_params, expected[1], strict=True))
    saved_opt, loaded_opt = expected[2], fresh.optimizer.state_dict()
    assert saved_opt["param_groups"] == loaded_opt["param_groups"]
    for key, values in saved_opt["state"].items():
        for name, value in values.items():
            assert torch.equal(loaded_opt["state"][key][name], value), name
    assert fresh.lr_scheduler.state_dict() == schedule and fresh.progress.step == 2


# --- 4. Ctrl-C and a full disk: the last checkpoint stays, one line says so -----------------------
def test_ctrl_c_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = DreamBoothRecipe.compute_loss

    def interrupt_in_step_3(self, batch):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(DreamBoothRecipe, "compute_loss", interrupt_in_step_3)
    try:
        code = cli_train(out, "train.max_train_steps=4", "train.checkpointing_steps=2")
    except KeyboardInterrupt:  # (left uncaught, it would stop the whole test session)
        pytest.fail("Ctrl-C escaped the command line with a traceback")
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    line = last_line(err)
    assert str(out / "checkpoint-2") in line and "train.resume_from_checkpoint=latest" in line
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*")) and not (out / "boft_weights.safetensors").exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save_file = adapter_format.save_file

    def disk_full_for_checkpoint_4(tensors, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(adapter_format, "save_file", disk_full_for_checkpoint_4)
    code = cli_train(out, "train.max_train_steps=4", "train.checkpointing_steps=2")
    line = last_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("error: ")
    assert str(out / "checkpoint-4") in line and "No space left on device" in line
    assert latest_checkpoint(out) == out / "checkpoint-2"
    assert not list(out.glob(".checkpoint-*"))  # the staging folder is gone
    monkeypatch.setattr(adapter_format, "save_file", real_save_file)
    result = run(
        make_config(
            out,
            "train.max_train_steps=4",
            "train.checkpointing_steps=2",
            "train.resume_from_checkpoint=latest",
        )
    )
    assert result.global_step == 4


def test_a_checkpoint_adapter_of_another_layout_is_refused_before_any_tensor_is_copied(tmp_path):
    from boft_diffusion import BOFTConfig
    from boft_diffusion.inject import adapter_state_dict, add_boft
    from boft_diffusion.io import save_boft_weights
    from boft_diffusion.tiny import build_tiny_pipeline

    other = {"unet": add_boft(build_tiny_pipeline(seed=0).unet, BOFTConfig(boft_block_size=4))}
    save_boft_weights(other, tmp_path)
    unet = add_boft(build_tiny_pipeline(seed=0).unet, BOFTConfig(boft_block_size=8, init_weights=False))
    before = {k: v.clone() for k, v in adapter_state_dict(unet).items()}
    with pytest.raises(ConfigError, match=r"does not fit this run's unet adapter.*shape"):
        checkpoint_module.load_adapter_tensors({"unet": unet}, tmp_path, "default")
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(unet).items())
