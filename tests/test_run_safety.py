"""Nothing lost, nothing silent: what a run may delete, what it writes when, and its errors.

A run owns only what it recorded in ``<output_dir>/.boft_diffusion_manifest.json``; overwrite
removes only those paths, inside output_dir, after every check passed. Bad configs, folders,
resolutions and devices fail before anything is written, naming the key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DREAMBOOTH_FAST, recipe_config

from boft_diffusion import cli
from boft_diffusion.data import DataError
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, run
from boft_diffusion.training import recipe as recipe_module
from boft_diffusion.training.args import ConfigError, load_config
from boft_diffusion.training.setup import RUN_CONFIG_NAME

MANIFEST = ".boft_diffusion_manifest.json"
FAST = [*DREAMBOOTH_FAST, "train.max_train_steps=1", "validation.num_inference_steps=1"]


def make_config(out: Path, *overrides: str) -> DreamBoothConfig:
    return recipe_config(DreamBoothConfig, out, *FAST, *overrides)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))
    }


def manifest(out: Path) -> set[str]:
    return set(json.loads((out / MANIFEST).read_text())["outputs"])


def user_folder(out: Path) -> None:
    """A folder of someone else's files, some sharing a name with what a run writes."""
    for rel in ("thesis.tex", "logs/notes.txt", "merged/model.bin", "checkpoint-7/weights.bin"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(f"precious {rel}")


# --- config values: rejected at load, naming the key -------------------------------------------------
BAD_VALUES = [
    ("train.snr_gamma", "0"),
    ("train.snr_gamma", "-5"),
    ("train.snr_gamma", "nan"),
    ("train.snr_gamma", "inf"),
    ("optim.max_grad_norm", "-1"),
    ("optim.max_grad_norm", "nan"),
    ("optim.max_grad_norm", "inf"),
    ("train.noise_offset", "-0.1"),
    ("train.noise_offset", "nan"),
    ("train.noise_offset", "inf"),
    ("optim.learning_rate", "nan"),
    ("optim.learning_rate", "inf"),
    ("optim.learning_rate", "0"),
    ("optim.learning_rate", "-1e-4"),
    ("optim.adam_beta1", "1.0"),
    ("optim.adam_beta1", "-0.1"),
    ("optim.adam_beta2", "1.5"),
    ("optim.adam_beta2", "nan"),
    ("optim.adam_epsilon", "-1e-8"),
    ("optim.adam_epsilon", "nan"),
    ("optim.adam_weight_decay", "-0.01"),
    ("optim.adam_weight_decay", "inf"),
    ("optim.lr_warmup_steps", "-1"),
    ("train.dataloader_num_workers", "-1"),
    ("train.seed", "-1"),
    ("validation.seed", "-1"),
    ("model.tiny_seed", "-1"),
    ("data.prior_loss_weight", "-1"),
    ("data.prior_loss_weight", "nan"),
    ("boft.dropout", "1.0"),
    ("boft.dropout", "-0.1"),
    ("train.logging_dir", "/tmp/elsewhere"),
    ("train.logging_dir", "../elsewhere"),
    ("train.logging_dir", "logs/../../elsewhere"),
    ("train.logging_dir", "."),
    ("validation.resolution", "20"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_values_are_rejected_at_load_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(DreamBoothConfig, None, [f"{key}={value}"])


def test_edge_values_that_are_fine_still_load():
    cfg = load_config(
        DreamBoothConfig,
        None,
        [
            "optim.max_grad_norm=0",
            "optim.adam_beta1=0",
            "optim.adam_weight_decay=0",
            "train.noise_offset=0",
            "train.snr_gamma=null",
            "boft.dropout=0",
            "data.prior_loss_weight=0",
            "train.logging_dir=runs/tensorboard",
            "validation.resolution=24",
        ],
    )
    assert cfg.train.logging_dir == "runs/tensorboard" and cfg.optim.max_grad_norm == 0


def test_a_bad_value_through_the_cli_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", "dreambooth", f"train.output_dir={out}", "optim.learning_rate=nan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "optim.learning_rate" in err
    assert not out.exists()


# --- overwrite: only what earlier runs recorded, inside output_dir -------------------------------------
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_a_run_records_everything_it_writes(tmp_path, monkeypatch, relative):
    out = tmp_path / "run"
    if relative:  # train.output_dir=outputs/run, as the quickstart's relative default is
        monkeypatch.chdir(tmp_path)
        out = Path("outputs/run")
    run(
        make_config(
            out, "train.max_train_steps=2", "train.checkpointing_steps=1", "train.report_to=tensorboard"
        )
    )
    recorded = manifest(out)
    assert {
        RUN_CONFIG_NAME,
        "boft_weights.safetensors",
        "README.md",
        "logs",
        "validation",
        "instance_images",
        "checkpoint-1",
        "checkpoint-2",
    } <= recorded
    unrecorded = {p.name for p in out.iterdir()} - recorded - {MANIFEST}
    assert not unrecorded
    assert all("/" not in entry for entry in recorded), recorded  # entries are relative to output_dir
    run(make_config(out, "boft.block_num=2", "train.overwrite_output_dir=true"))
    assert not (out / "checkpoint-2").exists()  # the earlier run's checkpoints were recorded as its own


def test_logging_dir_outside_the_output_dir_is_refused_and_nothing_outside_is_touched(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside"
    run(make_config(out))
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    for value in ("../outside", str(outside)):
        with pytest.raises(ConfigError, match="train.logging_dir"):
            make_config(out, "train.overwrite_output_dir=true", f"train.logging_dir={value}")
    assert (outside / "keep.txt").read_text() == "mine"


def test_overwrite_in_a_folder_of_someone_else_keeps_every_file(tmp_path):
    out = tmp_path / "mine"
    user_folder(out)
    before = snapshot(out)
    run(make_config(out, "train.overwrite_output_dir=true"))
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert (out / "boft_weights.safetensors").is_file()


def test_overwrite_never_writes_over_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    user_folder(out)
    (out / "README.md").write_text("my own readme")
    before = snapshot(out)
    with pytest.raises(ConfigError, match="README.md"):
        run(make_config(out, "train.overwrite_output_dir=true"))
    assert snapshot(out) == before


def test_overwrite_removes_an_earlier_run_but_not_files_added_beside_it(tmp_path):
    out = tmp_path / "run"
    run(
        make_config(
            out, "train.max_train_steps=2", "train.checkpointing_steps=1", "train.report_to=tensorboard"
        )
    )
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-9").mkdir()  # a name like ours, but not a checkpoint (no marker) and not recorded
    (out / "checkpoint-9" / "weights.bin").write_text("mine")
    run(make_config(out, "data.instance_prompt=a photo of sks dog", "train.overwrite_output_dir=true"))
    assert not (out / "checkpoint-1").exists() and not (out / "checkpoint-2").exists()
    assert not (out / "logs").exists()  # the earlier run's tracker files
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoint-9" / "weights.bin").read_text() == "mine"
    assert "sks dog" in (out / RUN_CONFIG_NAME).read_text()


def test_removal_follows_no_entry_or_link_out_of_the_output_dir(tmp_path):
    from boft_diffusion.training.setup import claim_output_dir, record_outputs, recorded_outputs

    out, outside = tmp_path / "run", tmp_path / "outside"
    for folder in (out, outside):
        folder.mkdir()
    (outside / "keep.txt").write_text("mine")
    (out / "link").symlink_to(outside, target_is_directory=True)
    (out / "ours.txt").write_text("ours")
    record_outputs(out, "ours.txt", "link", out / "link" / "keep.txt")
    text = json.loads((out / MANIFEST).read_text())
    text["outputs"] += ["../outside", str(outside)]  # a hand-edited manifest
    (out / MANIFEST).write_text(json.dumps(text))
    with pytest.raises(ValueError, match="outside"):
        record_outputs(out, "../outside")
    assert recorded_outputs(out) == [out / "ours.txt"]

    cfg = make_config(out, "train.overwrite_output_dir=true")
    with claim_output_dir(None, cfg.train):
        pass
    assert not (out / "ours.txt").exists()
    assert (outside / "keep.txt").read_text() == "mine" and (out / "link").is_symlink()


def test_a_failed_start_with_overwrite_puts_the_earlier_run_back(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(make_config(out, "train.max_train_steps=2", "train.checkpointing_steps=1"))
    before = snapshot(out)

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory while preparing")

    monkeypatch.setattr(recipe_module, "make_optimizer", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(make_config(out, "data.instance_prompt=a photo of sks dog", "train.overwrite_output_dir=true"))
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != MANIFEST} == {
        k: v for k, v in before.items() if k != MANIFEST
    }


# --- nothing written before every check passed ----------------------------------------------------------
def test_a_refused_resume_leaves_nothing_that_blocks_the_corrected_run(tmp_path):
    source = tmp_path / "a"
    run(make_config(source, "train.checkpointing_steps=1"))
    out = tmp_path / "b"
    wrong = make_config(out, "boft.block_num=2", f"train.resume_from_checkpoint={source / 'checkpoint-1'}")
    with pytest.raises(ConfigError):
        run(wrong)
    assert not (out / RUN_CONFIG_NAME).exists()
    fixed = make_config(
        out, "train.max_train_steps=2", f"train.resume_from_checkpoint={source / 'checkpoint-1'}"
    )
    assert run(fixed).global_step == 2


def test_a_start_that_fails_in_setup_leaves_no_run_config(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = recipe_module.make_optimizer

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory while preparing")

    monkeypatch.setattr(recipe_module, "make_optimizer", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(make_config(out))
    assert not (out / RUN_CONFIG_NAME).exists()
    monkeypatch.setattr(recipe_module, "make_optimizer", real)
    result = run(make_config(out, "boft.block_num=2"))  # another adapter, no overwrite needed: nothing ran
    assert result.global_step == 1 and "block_num: 2" in (out / RUN_CONFIG_NAME).read_text()


def test_an_output_dir_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="train.output_dir"):
        run(make_config(blocker / "run"))
    assert cli.main(["train", "dreambooth", f"train.output_dir={blocker / 'run'}", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert blocker.read_text() == "x"


def test_an_output_dir_in_a_read_only_folder(tmp_path, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    if os.geteuid() == 0:  # root may write into read-only folders: answer as the permissions say
        from boft_diffusion.training import setup as setup_module

        real_access = os.access
        monkeypatch.setattr(
            setup_module.os,
            "access",
            lambda p, mode, **kw: (
                False if Path(p) == parent and mode & os.W_OK else real_access(p, mode, **kw)
            ),
        )
    try:
        with pytest.raises(ConfigError, match="not writable"):
            run(make_config(parent / "run"))
    finally:
        parent.chmod(0o700)
    assert not (parent / "run").exists()


def test_a_class_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = tmp_path / "out"
    cfg = make_config(
        out,
        "data.with_prior_preservation=true",
        "data.class_prompt=a photo of a toy",
        f"data.class_data_dir={blocker / 'class'}",
    )
    with pytest.raises(DataError, match="data.class_data_dir"):
        run(cfg)
    assert not out.exists()


def test_a_resolution_the_model_cannot_use_fails_before_anything_is_written(tmp_path, monkeypatch):
    real_load = recipe_module.load_pipeline

    def load_with_a_coarser_vae(model):
        pipe = real_load(model)
        pipe.vae_scale_factor = 16  # as a VAE with one more downsampling stage would have
        return pipe

    monkeypatch.setattr(recipe_module, "load_pipeline", load_with_a_coarser_vae)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"data.resolution.*multiple of 16"):
        run(make_config(out, "data.resolution=40"))
    with pytest.raises(ConfigError, match=r"validation.resolution.*multiple of 16"):
        run(make_config(out, "data.resolution=32", "validation.resolution=24"))
    assert not out.exists()


# --- devices the machine lacks --------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is fine on a GPU")
def test_fp16_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16 needs a GPU"):
        run(make_config(out, "train.mixed_precision=fp16"))
    assert not out.exists()


@pytest.mark.slow
def test_a_device_that_does_not_exist(tmp_path):
    # accelerate picks the device once per process: a fresh process (no private reset of its state)
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_TORCH_DEVICE": "cuda:99", "HF_HUB_OFFLINE": "1"}
    main = "import sys; from boft_diffusion.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", main, "train", "dreambooth", *FAST, f"train.output_dir={out}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ACCELERATE_TORCH_DEVICE=cuda:99" in errors[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpus_asked_for_on_a_machine_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=0"):
        run(make_config(out))
    assert not out.exists()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # "no GPU", as the two-process test sets it
    assert run(make_config(out)).global_step == 1
