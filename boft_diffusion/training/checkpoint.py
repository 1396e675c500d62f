"""Checkpoints: the full training state, stored so that loading it never runs code.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds

- ``boft_weights.safetensors``: the trained tensors (loadable by ``load_boft_weights``; the frozen
  base weights are never saved);
- ``optimizer.safetensors``: the optimiser's tensors; its metadata holds, as JSON, the rest of the
  optimiser state, the learning-rate schedule and the gradient scaler;
- ``rng_state_<rank>.safetensors``, one per process: the torch generator states (CPU and the
  process's device) as tensors, Python's and NumPy's as JSON metadata;
- ``checkpoint.json``, written last, marking it complete: the step, the number of processes, the
  config values the state depends on (:func:`resume_keys`) and the size and SHA-256 of every file.

Nothing is ever unpickled: accelerate's ``save_state``/``load_state`` (pickles, some loaded with
``weights_only=False``, so a planted file runs code) are not used, and files the marker does not
list are ignored. The main process writes the checkpoint into a staging folder and renames it into
place only when it is complete and finite, so a run killed or out of disk while saving leaves the
previous checkpoint intact; older ones are pruned (:func:`prune_checkpoints`) only after. A resume is exact or refused
with a :class:`ConfigError` naming the missing or corrupt file or the changed config key
(:func:`check_resume` runs every check possible before anything is written).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import safe_open
from torch import nn

from ..atomic import atomic_write_text, staged_dir
from ..inject import adapter_state_dict, load_adapter_state_dict
from ..io import ADAPTER_WEIGHTS_NAME, AdapterFile, AdapterFormatError, read_adapter, write_adapter
from ..io.format import atomic_save_safetensors
from ..trained_state import trained_states
from .args import ConfigError, config_to_dict
from .ema import EMA_FILE, AdapterEMA
from .loop import TrainingDiverged, TrainingError, TrainingInterrupted, first_nonfinite
from .optim import schedule_keys
from .sharding import full_adapter, full_state, shard_like, shard_optimizer_state
from .state_codec import (
    RandomState,
    decode_state,
    encode_state,
    parse_random_state,
    random_state,
    restore_random_state,
)

__all__ = [
    "CHECKPOINT_MARKER",
    "OPTIMIZER_FILE",
    "CheckpointWriteError",
    "TrainProgress",
    "TrainingState",
    "check_finite_adapter",
    "check_resume",
    "interruption",
    "latest_checkpoint",
    "list_checkpoints",
    "load_adapter_tensors",
    "load_checkpoint",
    "prune_checkpoints",
    "resolve_resume_checkpoint",
    "resume_keys",
    "rng_state_file",
    "save_checkpoint",
]

CHECKPOINT_MARKER = "checkpoint.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT, VERSION = "boft_diffusion.checkpoint", 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
_FIX = "resume from another checkpoint or start a new run without train.resume_from_checkpoint"


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


class TrainProgress:
    """Optimiser steps done so far; saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0


@dataclass
class TrainingState:
    """What a checkpoint saves and restores (``components``: the unwrapped adapted models).

    ``config`` holds the config values the saved state depends on (:func:`resume_keys`); a
    resume must have the same. The gradient scaler is the accelerator's.
    """

    components: Mapping[str, nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    progress: TrainProgress
    adapter_name: str = "default"
    config: dict[str, Any] = field(default_factory=dict)
    ema: AdapterEMA | None = None
    """The moving average of the trained tensors (``train.ema_decay``), saved as :data:`EMA_FILE`."""


def rng_state_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


# --- finding checkpoints --------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and (path / CHECKPOINT_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``None``, ``latest`` (may be none yet) or a folder.

    A bare name like ``checkpoint-100`` is looked up in ``output_dir``. A folder that does not
    exist or is not a complete checkpoint raises :class:`ConfigError`.
    """
    if value is None:
        return None
    if value == "latest":
        return latest_checkpoint(output_dir)
    path = Path(value).expanduser()
    if not path.exists() and (Path(output_dir) / value).exists():
        path = Path(output_dir) / value
    if not path.is_dir():
        raise ConfigError(f"train.resume_from_checkpoint={value!r} does not exist")
    if not (path / CHECKPOINT_MARKER).is_file():
        raise ConfigError(
            f"train.resume_from_checkpoint={value!r} is not a complete checkpoint (no {CHECKPOINT_MARKER})"
        )
    return path


# --- what must not change on resume ---------------------------------------------------------------
def resume_keys(cfg: Any, schedule_steps: int | None = None) -> dict[str, Any]:
    """Config values (dotted keys) a checkpoint's state depends on; a resume must keep them.

    ``cfg`` has ``boft``, ``optim`` and ``train`` sections. The BOFT layout (every ``boft`` key but
    dropout) shapes the saved tensors; the optimiser and schedule keys (:func:`schedule_keys`, with
    the resolved ``schedule_steps`` when known) are restored from the checkpoint; batch size and
    accumulation fix where in the data a step is; the seed fixes the data order the restored
    random state continues. Everything else (steps of a constant schedule, clipping, logging,
    validation, dropout) may change, and applies from the resumed step on.
    """
    keys = {f"boft.{k}": v for k, v in config_to_dict(cfg.boft).items() if k != "dropout"}
    keys |= schedule_keys(cfg.optim, cfg.train, schedule_steps)
    for key in ("train_batch_size", "gradient_accumulation_steps", "seed"):
        keys[f"train.{key}"] = getattr(cfg.train, key)
    if cfg.train.ema_decay:  # the saved average continues with it (a checkpoint without one has no key)
        keys["train.ema_decay"] = cfg.train.ema_decay
    return json.loads(json.dumps(keys))  # as the checkpoint will hold them (lists, not tuples)


def _why(key: str) -> str:
    if key.startswith("boft."):
        return "this run's adapter needs a checkpoint of the same BOFT layout"
    if key in ("train.train_batch_size", "train.gradient_accumulation_steps"):
        return "where the data resumes (and a scaled learning rate) depends on it"
    if key == "train.ema_decay":
        return "the saved moving average continues with its decay"
    if key == "train.seed":
        return "the restored random state continues the data order of that seed"
    return "the optimiser and learning-rate schedule state restored from it would keep the old value"


def _check_same_run(folder: Path, marker: dict[str, Any], keys: Mapping[str, Any], processes: int) -> None:
    saved_n = marker["num_processes"]
    if saved_n != processes:
        raise ConfigError(
            f"train.resume_from_checkpoint: {folder} was saved by {saved_n} processes, this run has "
            f"{processes}; the data position, random states and schedule depend on it: resume with "
            f"{saved_n} processes, or {_FIX}"
        )
    saved = marker["config"]
    for key, value in keys.items():
        if key in saved and json.dumps(saved[key]) != json.dumps(value):
            fix = "" if key.endswith("(resolved)") else f"set {key}={saved[key]!r} to resume, or "
            raise ConfigError(
                f"train.resume_from_checkpoint: {folder} was saved with {key}={saved[key]!r}, this run "
                f"has {key}={value!r}; {_why(key)}: {fix}{_FIX}"
            )


def _launched_processes() -> int:
    """Processes this launch starts (``WORLD_SIZE`` from accelerate launch / torchrun; else 1)."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def check_resume(checkpoint_path: str | Path, cfg: Any) -> None:
    """Refuse a checkpoint that this run cannot resume exactly; reads only, writes nothing.

    Checks that the marker is of this format (an older accelerate-pickle checkpoint is refused,
    never loaded), that every file it lists is there with its saved size and SHA-256 and parses
    without running code, that it was saved by as many processes as this launch has
    (``WORLD_SIZE``), and that the config keys its state depends on (:func:`resume_keys`: BOFT
    layout, optimiser, schedule, batch, seed) are unchanged. Raises :class:`ConfigError` naming the
    file or the key, its saved and its current value. What needs the live models (tensor shapes,
    the resolved schedule length, the device) is checked again by :func:`load_checkpoint`.
    """
    folder = Path(checkpoint_path)
    marker = _open_checkpoint(folder)
    _check_same_run(folder, marker, resume_keys(cfg), _launched_processes())
    _read_adapter(folder)
    _read_optimizer(folder / OPTIMIZER_FILE)
    for rank in range(marker["num_processes"]):
        _read_rng(folder / rng_state_file(rank))


# --- reading --------------------------------------------------------------------------------------
def _read_marker(folder: Path) -> dict[str, Any]:
    file = folder / CHECKPOINT_MARKER
    if not file.is_file():
        raise ConfigError(f"{folder} is not a complete checkpoint (no {CHECKPOINT_MARKER}); {_FIX}")
    try:
        marker = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ConfigError(f"{file} is unreadable or truncated ({err}); {_FIX}") from err
    if not isinstance(marker, dict) or "format" not in marker:
        raise ConfigError(
            f"{folder} was saved by an earlier boft-diffusion as accelerate pickles, which are never "
            f"loaded (unpickling can run code); {_FIX}"
        )
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise ConfigError(
            f"{file}: checkpoint format {marker.get('format')!r} version {marker.get('version')!r}; this "
            f"boft-diffusion reads {FORMAT!r} version {VERSION}; {_FIX}"
        )
    files, config = marker.get("files"), marker.get("config")
    valid = (
        isinstance(marker.get("step"), int)
        and marker["step"] >= 0
        and isinstance(marker.get("num_processes"), int)
        and marker["num_processes"] >= 1
        and isinstance(config, dict)
        and isinstance(files, dict)
        and all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        )
    )
    if not valid:
        raise ConfigError(f"{file} is malformed (step, num_processes, config or files); {_FIX}")
    return marker


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_checkpoint(folder: Path) -> dict[str, Any]:
    """The marker of ``folder``, after checking that every file it needs is listed, present and
    intact (size and SHA-256 as saved). A listed name that leaves the folder (absolute, ``..``, or a
    link out of it) is refused unread: the marker names files, it never chooses paths elsewhere."""
    marker = _read_marker(folder)
    listed = marker["files"]
    needed = [ADAPTER_WEIGHTS_NAME, OPTIMIZER_FILE, *map(rng_state_file, range(marker["num_processes"]))]
    for name in needed:
        if name not in listed:
            raise ConfigError(
                f"{folder / CHECKPOINT_MARKER} lists no {name}: the checkpoint is incomplete; {_FIX}"
            )
    inside = folder.resolve()
    for name, info in listed.items():
        parts = PurePosixPath(name).parts
        path = folder / name
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or not _resolves_in(path, inside):
            raise ConfigError(
                f"{folder / CHECKPOINT_MARKER} lists {name!r}, a path outside the checkpoint "
                f"(a checkpoint's files are its own: none is read through a link out of it); {_FIX}"
            )
        if not path.is_file():
            raise ConfigError(f"{path} is missing: the checkpoint is incomplete; {_FIX}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise ConfigError(
                f"{path} is truncated or corrupt ({size} bytes, {info['bytes']} were saved); {_FIX}"
            )
        if _sha256(path) != info["sha256"]:
            raise ConfigError(f"{path} is corrupt (its SHA-256 differs from the one saved); {_FIX}")
    return marker


def _resolves_in(path: Path, folder: Path) -> bool:
    """Whether ``path``, its links resolved, lies inside ``folder`` (a resolved path)."""
    return path.resolve().is_relative_to(folder)


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ConfigError(f"{file} is not a readable safetensors file ({err}); {_FIX}") from err
    return tensors, metadata


def _read_adapter(folder: Path) -> Any:
    try:
        return read_adapter(folder / ADAPTER_WEIGHTS_NAME)
    except (AdapterFormatError, OSError) as err:
        raise ConfigError(f"{err}; {_FIX}") from err


def _read_optimizer(file: Path) -> tuple[dict, dict, dict | None]:
    """``(optimizer, lr_scheduler, grad_scaler)`` state dicts from ``optimizer.safetensors``."""
    tensors, metadata = _read_safetensors(file)
    try:
        optimizer, scheduler, scaler = (
            decode_state(json.loads(metadata[key]), tensors)
            for key in ("optimizer", "lr_scheduler", "grad_scaler")
        )
        if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
            raise ValueError("no optimiser state and param_groups")
        if not isinstance(scheduler, dict) or not isinstance(scaler, dict | None):
            raise ValueError("the schedule or scaler state is not a mapping")
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        raise ConfigError(
            f"{file} holds no valid optimiser state ({type(err).__name__}: {err}); {_FIX}"
        ) from err
    return optimizer, scheduler, scaler


def _read_rng(file: Path) -> RandomState:
    """One process's saved random state, each part checked on a private generator (the global ones are
    not touched)."""
    tensors, metadata = _read_safetensors(file)
    try:
        return parse_random_state(tensors, metadata)
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError, RecursionError) as err:
        raise ConfigError(
            f"{file} holds no valid random state ({type(err).__name__}: {err}); {_FIX}"
        ) from err


@torch.no_grad()
def load_adapter_tensors(components: Mapping[str, nn.Module], folder: str | Path, adapter_name: str) -> None:
    """Copy a saved adapter's tensors into the existing adapter ``adapter_name`` of ``components``.

    :func:`~boft_diffusion.inject.load_adapter_state_dict` (the inverse of what the checkpoint saved)
    checks every key and shape first; a checkpoint of another adapter layout is a :class:`ConfigError`.
    """
    saved = _read_adapter(Path(folder))
    for comp, module in components.items():
        current = adapter_state_dict(module, adapter_name)
        tensors = {
            key: shard_like(value, current[key])
            if key in current and value.shape == current[key].shape
            else value
            for key, value in saved.tensors.get(comp, {}).items()
        }  # sharded runs: each process keeps its shard of the full saved tensor
        try:
            load_adapter_state_dict(module, tensors, adapter_name)
        except ValueError as err:
            raise ConfigError(
                f"Checkpoint {folder} does not fit this run's {comp} adapter (another BOFT config?): {err}"
            ) from err
    for kind in trained_states():  # state besides BOFT's (new token embeddings, ...)
        if kind.carried_by(saved):
            try:
                kind.restore(components, saved, adapter_name)
            except ValueError as err:
                raise ConfigError(
                    f"Checkpoint {folder} does not fit this run's {kind.name} state: {err}"
                ) from err


def load_checkpoint(accelerator: Accelerator, folder: str | Path, state: TrainingState) -> None:
    """Restore ``state`` (adapter, optimiser, schedule, scaler, step) and this process's random
    state from ``folder``; every process calls this. Everything is read and checked first."""
    folder = Path(folder)
    marker = _open_checkpoint(folder)
    _check_same_run(folder, marker, state.config, accelerator.num_processes)
    optimizer, scheduler, scaler = _read_optimizer(folder / OPTIMIZER_FILE)
    rng = _read_rng(folder / rng_state_file(accelerator.process_index))
    load_adapter_tensors(state.components, folder, state.adapter_name)
    if state.ema is not None:
        _load_ema(state.ema, folder)
    try:
        state.optimizer.load_state_dict(shard_optimizer_state(state.optimizer, optimizer))
        state.lr_scheduler.load_state_dict(scheduler)
        if scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(scaler)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"{folder / OPTIMIZER_FILE} does not fit this run's optimiser ({err}); {_FIX}"
        ) from err
    state.progress.step = marker["step"]
    restore_random_state(rng, accelerator.device, str(folder))


def _load_ema(ema: AdapterEMA, folder: Path) -> None:
    """The moving average saved in ``folder`` (checked by :func:`_open_checkpoint` with every file)."""
    file = folder / EMA_FILE
    if not file.is_file():
        raise ConfigError(
            f"train.resume_from_checkpoint: {folder} holds no moving average ({EMA_FILE}) for train.ema_decay; "
            f"{_FIX}"
        )
    tensors, metadata = _read_safetensors(file)
    try:
        ema.load_state(tensors, metadata)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{file} does not fit this run's moving average ({err}); {_FIX}") from err


# --- writing --------------------------------------------------------------------------------------
def _optimizer_payload(state: TrainingState, scaler: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    metadata = {
        "optimizer": json.dumps(encode_state(full_state(state.optimizer.state_dict()), tensors)),
        "lr_scheduler": json.dumps(encode_state(state.lr_scheduler.state_dict(), tensors)),
        "grad_scaler": json.dumps(encode_state(None if scaler is None else scaler.state_dict(), tensors)),
    }
    return tensors, metadata


def check_finite_adapter(adapter: AdapterFile, what: str) -> None:
    """Raise :class:`TrainingDiverged` before ``what`` is saved if an adapter tensor is NaN or inf
    (``adapter``: the full tensors, :func:`~boft_diffusion.training.sharding.full_adapter`)."""
    groups = [*adapter.tensors.items(), *((f"state.{kind}", t) for kind, t in adapter.states.items())]
    named = ((f"{group}.{key}", tensor) for group, tensors in groups for key, tensor in tensors.items())
    bad = first_nonfinite(named)
    if bad is not None:
        raise TrainingDiverged(f"Not saving {what}: the adapter tensor {bad} is NaN or inf")


def _files(folder: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != CHECKPOINT_MARKER:
            yield path.relative_to(folder).as_posix(), path


def _describe(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a written file, flushed to disk first (a marker never outlives its data)."""
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _write_checkpoint(
    final: Path,
    step: int,
    state: TrainingState,
    adapter: AdapterFile,
    payload: tuple[dict[str, torch.Tensor], dict[str, str]],
    rng_states: list[tuple[dict[str, torch.Tensor], dict[str, str]]],
    extra: Callable[[Path], Any] | None,
) -> None:
    """Main process: fill a staging folder, mark it complete, rename it to ``final``."""
    with staged_dir(final, replace=True) as staging:
        write_adapter(adapter, staging)
        atomic_save_safetensors(payload[0], staging / OPTIMIZER_FILE, payload[1])
        for rank, (tensors, metadata) in enumerate(rng_states):
            atomic_save_safetensors(tensors, staging / rng_state_file(rank), metadata)
        if state.ema is not None:
            tensors, metadata = state.ema.state()
            atomic_save_safetensors(tensors, staging / EMA_FILE, metadata)
        if extra is not None:
            extra(staging)
        marker = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "num_processes": len(rng_states),
            "config": state.config,
            "files": {name: _describe(path) for name, path in _files(staging)},
        }
        atomic_write_text(staging / CHECKPOINT_MARKER, json.dumps(marker, indent=1) + "\n")


def prune_checkpoints(output_dir: str | Path, keep: Path, total_limit: int | None) -> list[Path]:
    """Remove the oldest complete checkpoints other than ``keep`` (the one just saved) so that at
    most ``total_limit`` remain; returns the removed folders. Main process, and only after
    :func:`save_checkpoint` succeeded, so a failed or non-finite save never costs a good one."""
    if total_limit is None:
        return []
    others = [path for _, path in list_checkpoints(output_dir) if path != Path(keep)]
    removed = []
    for old in others[: max(0, len(others) - (total_limit - 1))]:
        if old.is_symlink():
            continue  # a link, not a folder this tool made
        shutil.rmtree(old, ignore_errors=True)
        if not old.exists():
            removed.append(old)
    return removed


def _failure(final: Path, err: OSError) -> str:
    cause = err.strerror or str(err) or type(err).__name__
    last = latest_checkpoint(final.parent)
    kept = f"the last complete checkpoint is {last}" if last else "no earlier checkpoint exists"
    return f"Could not save the checkpoint {final}: {cause}; nothing of it was kept, {kept}"


def _raise_if_failed(accelerator: Accelerator, final: Path, error: Exception | None) -> None:
    """Every process raises if the main process failed to write (so that none waits forever)."""
    failed = error is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(failed)], device=accelerator.device)
        failed = bool(accelerator.reduce(flag, reduction="sum").item())
    if not failed:
        return
    if error is None:
        raise CheckpointWriteError(f"Could not save the checkpoint {final}: the main process failed")
    if isinstance(error, OSError):
        raise CheckpointWriteError(_failure(final, error)) from error
    raise error


def save_checkpoint(
    accelerator: Accelerator,
    state: TrainingState,
    output_dir: str | Path,
    step: int,
    extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Save ``state`` at ``step`` as ``<output_dir>/checkpoint-<step>``; every process must call this.

    A NaN or inf adapter or optimiser tensor raises :class:`TrainingDiverged` before anything is
    written. The main process writes everything (the other processes send it their random states);
    ``extra(folder)`` may add files before the checkpoint is marked complete. A failed write (full
    disk) removes the staging folder and raises :class:`CheckpointWriteError` on every process.
    Older checkpoints are left alone (see :func:`prune_checkpoints`).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    adapter = full_adapter(state.components, state.adapter_name)  # every process: gathers shards
    check_finite_adapter(adapter, f"the checkpoint {final}")
    payload = _optimizer_payload(state, accelerator.scaler)
    bad = first_nonfinite(payload[0].items())
    if bad is not None:
        raise TrainingDiverged(f"Not saving the checkpoint {final}: the optimiser state holds NaN or inf")
    rng_states = gather_object([random_state(accelerator.device)])
    error = None
    if accelerator.is_main_process:
        try:
            _write_checkpoint(final, step, state, adapter, payload, rng_states, extra)
        except Exception as err:  # reported on every process by _raise_if_failed
            error = err
    _raise_if_failed(accelerator, final, error)
    return final


def interruption(output_dir: str | Path, step: int) -> TrainingInterrupted:
    """The error for Ctrl-C after ``step`` steps: where the last checkpoint is and how to resume."""
    last = latest_checkpoint(output_dir)
    if last is None:
        return TrainingInterrupted(
            f"Interrupted after step {step}; no checkpoint was saved in {output_dir} yet "
            "(train.checkpointing_steps), so a rerun starts from step 0"
        )
    return TrainingInterrupted(
        f"Interrupted after step {step}; the last checkpoint is {last}: resume with the same config "
        "and train.resume_from_checkpoint=latest"
    )
