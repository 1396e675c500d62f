"""Checkpoints: the full training state (accelerate ``save_state``) plus the adapter in the project's format.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds the optimiser, schedule, RNG and progress
state from accelerate, ``boft_weights.safetensors`` (the trained tensors, loadable by
``load_boft_weights``; the frozen base weights are never saved) and ``checkpoint.json`` marking
it complete. It is written into ``.checkpoint-<step>.tmp`` and renamed into place, so a run
killed while saving leaves the previous checkpoint intact; older ones are pruned only after.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..inject import adapter_state_dict
from ..io import read_adapter, save_boft_weights
from .args import ConfigError

__all__ = [
    "CHECKPOINT_MARKER",
    "TrainProgress",
    "latest_checkpoint",
    "list_checkpoints",
    "register_adapter_checkpointing",
    "resolve_resume_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_MARKER = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class TrainProgress:
    """Optimiser steps done so far; saved with every checkpoint (accelerate custom state)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])


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


def register_adapter_checkpointing(
    accelerator: Accelerator, components: Mapping[str, nn.Module], adapter_name: str = "default"
) -> None:
    """Make ``save_state`` / ``load_state`` store only the adapter of the prepared models.

    ``components`` maps a component name (``unet``, ``text_encoder``) to its unwrapped module.
    Saving writes ``boft_weights.safetensors`` (main process) instead of full model weights;
    loading copies the saved tensors back into the adapter's parameters.
    """
    ours = {id(m) for m in components.values()}

    def is_ours(model: nn.Module) -> bool:
        return id(accelerator.unwrap_model(model)) in ours

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            save_boft_weights(dict(components), output_dir, adapter_name)
        for i in reversed(range(len(weights))):
            if i < len(models) and is_ours(models[i]):
                weights.pop(i)

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        load_adapter_tensors(components, input_dir, adapter_name)
        for i in reversed(range(len(models))):
            if is_ours(models[i]):
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


@torch.no_grad()
def load_adapter_tensors(components: Mapping[str, nn.Module], folder: str | Path, adapter_name: str) -> None:
    """Copy a saved adapter's tensors into the existing adapter ``adapter_name`` of ``components``."""
    saved = read_adapter(folder)
    for comp, module in components.items():
        current = adapter_state_dict(module, adapter_name)
        tensors = saved.tensors.get(comp, {})
        if set(tensors) != set(current):
            missing = sorted(set(current) ^ set(tensors))[:3]
            raise ConfigError(
                f"Checkpoint {folder} does not match this run's {comp} adapter (keys {missing})"
            )
        wrong = [k for k, t in current.items() if tuple(t.shape) != tuple(tensors[k].shape)]
        if wrong:
            raise ConfigError(
                f"Checkpoint {folder} has {comp}.{wrong[0]} of shape {tuple(tensors[wrong[0]].shape)}, "
                f"this run's adapter needs {tuple(current[wrong[0]].shape)} (another BOFT config?)"
            )
        for key, target in current.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    total_limit: int | None = None,
    extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Save the training state at ``step`` atomically; every process must call this.

    ``extra(folder)`` may add files (main process) before the checkpoint is marked complete.
    With ``total_limit``, the oldest complete checkpoints beyond it are removed afterwards.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(staging)
        (staging / CHECKPOINT_MARKER).write_text(json.dumps({"step": step}), encoding="utf-8")
        _replace_dir(staging, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _replace_dir(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is moved aside first, then deleted."""
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.old")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(target, aside)
    os.replace(source, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
