"""scripts/pretrain_tiny.py: a short run is deterministic from its seed, writes loadable weights, and a run
killed at any moment continues where it stopped to the same weights."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from boft_diffusion import tiny

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny.py"
SHORT = [
    "--vae-steps",
    "2",
    "--vae-batch",
    "2",
    "--scenes",
    "8",
    "--unet-steps",
    "2",
    "--batch",
    "2",
    "--decoder-steps",
    "2",
    "--name-steps",
    "2",
]


def command(out: Path, *extra: str) -> list[str]:
    state = out.with_suffix(".state")  # each output its own run
    return [
        *(sys.executable, str(SCRIPT), "--out", str(out), "--state", str(state), *SHORT),
        *("--eval-prompts", "1", "--threads", "1", *extra),
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pretrain(out: Path, *extra: str) -> str:
    done = subprocess.run(command(out, *extra), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_short_pretraining_is_reproducible_and_loads(tmp_path):
    log = pretrain(tmp_path / "a.safetensors")
    pretrain(tmp_path / "b.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys()
    # Same seed, same settings: the same weights up to float reduction order (see the note in the script).
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
    digest = [hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()]
    assert "scorer reads samples of held-out pairs" in log
    pipe = tiny.build_tiny_pipeline(weights=tmp_path / "a.safetensors")
    info = tiny.load_world_weights(pipe, tmp_path / "a.safetensors")
    assert '"unet_steps": 2' in info["pretraining"]
    c = tmp_path / "c.safetensors"
    pretrain(c, "--seed", "1")
    assert hashlib.sha256(c.read_bytes()).hexdigest() != digest[0]
    # The same --state with other settings is refused, naming what differs.
    done = subprocess.run(command(c, "--seed", "2"), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "seed differ" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_a_state_folder_of_something_else_is_refused_and_left_alone(tmp_path):
    """The run loads and later removes <stage>.loop.pt in --state: a folder it did not start is refused first."""
    out = tmp_path / "w.safetensors"
    state = out.with_suffix(".state")
    state.mkdir()
    (state / "vae.loop.pt").write_bytes(b"someone else's")
    done = subprocess.run(command(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no settings.json" in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in state.iterdir()) == ["vae.loop.pt"]
    assert (state / "vae.loop.pt").read_bytes() == b"someone else's" and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["denoiser", "names"])
def test_a_killed_run_continues_to_the_same_weights(tmp_path, stage):
    """Killed (SIGKILL) right after a mid-stage save, then run again: the weights of an uninterrupted run."""
    longer = ["--unet-steps", "6", "--name-steps", "6", "--save-every", "0"]  # saves after every step
    pretrain(tmp_path / "whole.safetensors", *longer)
    out = tmp_path / "resumed.safetensors"
    saved = out.with_suffix(".state") / f"{stage}.loop.pt"
    run = subprocess.Popen(command(out, *longer), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not saved.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists(), "the run ended before it could be killed mid-stage"
    log = pretrain(out, *longer)
    assert f"{stage}: resuming at step" in log
    from safetensors.torch import load_file

    whole, resumed = load_file(str(tmp_path / "whole.safetensors")), load_file(str(out))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), [
        k for k in whole if not torch.equal(whole[k], resumed[k])
    ][:5]


def other_architecture(path: Path) -> Path:
    """The shipped world weights with one tensor of another shape: a world file of another architecture."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny.TINY_WORLD_WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(tiny.TINY_WORLD_WEIGHTS))
    tensors["unet.conv_in.weight"] = torch.zeros(64, 8, 3, 3, dtype=torch.float16)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("weights", "expect"),
    [
        (other_architecture, "unet.conv_in.weight has shape (64, 8, 3, 3), the model (32, 4, 3, 3)"),
        (lambda p: save_file_of({"w": torch.zeros(2)}, p), "w.safetensors is not a tiny world weights file"),
        (lambda p: p, "no tiny world weights at"),
    ],
    ids=["another architecture", "another file format", "missing"],
)
def test_report_only_on_weights_it_cannot_read_is_one_error_line(tmp_path, weights, expect):
    path = weights(tmp_path / "w.safetensors")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--report-only", str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    # (transformers may warn on import, e.g. that torchvision is missing: not the script's lines)
    ours = [line for line in done.stderr.splitlines() if not line.startswith("[transformers]")]
    assert len(ours) == 1 and ours[0].startswith("error: --report-only: ") and expect in ours[0], ours
    assert done.stdout == ""


def save_file_of(tensors: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path
