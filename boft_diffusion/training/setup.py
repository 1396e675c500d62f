"""Accelerate setup, base-pipeline loading, precision and memory switches, checks made before training.

Everything here that can reject a run does so before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from torch import nn

from .args import ConfigError, ModelArgs, OptimArgs, TrainArgs

__all__ = [
    "RUN_CONFIG_NAME",
    "cast_frozen_weights",
    "check_environment",
    "check_model_source",
    "check_output_dir",
    "enable_memory_savers",
    "load_pipeline",
    "make_accelerator",
    "prepare_output_dir",
    "weight_dtype",
]

RUN_CONFIG_NAME = "training_config.yaml"
"""The resolved config a run writes into its output_dir; it also identifies the run there."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _distributed_cpu() -> bool:
    """Several processes (``accelerate launch``, ``torchrun``) on a machine without CUDA: use gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 and "LOCAL_RANK" in os.environ and not torch.cuda.is_available()


def make_accelerator(train: TrainArgs) -> Accelerator:
    """An ``Accelerator`` for ``train``: accumulation, precision, tracker, project folders.

    Launched as several processes on a CPU-only machine, it runs data-parallel over gloo
    (accelerate itself would otherwise start independent single-process runs). A second run in
    the same process (a notebook, tests) may change precision or accumulation: accelerate's
    per-process singletons are reset first, keeping the distributed state.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    project = ProjectConfiguration(
        project_dir=train.output_dir, logging_dir=str(Path(train.output_dir) / train.logging_dir)
    )
    return Accelerator(
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        mixed_precision=train.mixed_precision,
        log_with=None if train.report_to == "none" else train.report_to,
        project_config=project,
        cpu=_distributed_cpu(),
    )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights are stored in under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cast_frozen_weights(modules: Iterable[nn.Module | None], dtype: torch.dtype, device: Any = None) -> None:
    """Move ``modules`` to ``device`` with frozen weights in ``dtype``; trained ones stay float32."""
    for module in modules:
        if module is None:
            continue
        module.to(device)
        if any(p.dtype != dtype for p in module.parameters() if not p.requires_grad):
            module.to(dtype)  # (diffusers warns when a model casts itself; harmless here)
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def check_environment(train: TrainArgs, optim: OptimArgs) -> None:
    """Optional packages and hardware the config asks for: a clear error now, not mid-run."""
    if optim.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "optim.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes (or use optim.optimizer=adamw)"
        )
    if train.enable_xformers_memory_efficient_attention:
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError(
                "train.enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                "(or set it to false; PyTorch's SDPA attention is used then)"
            )
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.enable_xformers_memory_efficient_attention needs a CUDA GPU; none is available"
            )
    for tracker, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if train.report_to == tracker and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"train.report_to={tracker} needs {package}: pip install {package} (or report_to=none)"
            )
    if train.export_merged:
        try:
            from .. import export
        except ImportError as err:
            raise ConfigError(
                f"train.export_merged needs boft_diffusion.export, which is not available ({err})"
            ) from err
        if not hasattr(export, "export_merged"):
            raise ConfigError(
                "train.export_merged: boft_diffusion.export has no export_merged in this version"
            )


def check_model_source(name: str | None) -> None:
    """A local folder must be a diffusers pipeline; anything else must look like a hub id."""
    if name is None:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"model.pretrained_model_name_or_path={name!r} is not a diffusers pipeline folder "
                "(no model_index.json); save one with pipe.save_pretrained(folder)"
            )
        return
    if not _HUB_ID.match(name):
        raise ConfigError(
            f"model.pretrained_model_name_or_path={name!r} does not exist (and is not a hub id like 'org/model')"
        )


def load_pipeline(model: ModelArgs, torch_dtype: torch.dtype | None = None) -> Any:
    """The base ``StableDiffusionPipeline`` (the embedded tiny one without a model path).

    Failures (missing hub access, a folder of another pipeline type) raise :class:`ConfigError`.
    """
    from diffusers import StableDiffusionPipeline

    if model.pretrained_model_name_or_path is None:
        from ..tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(model.tiny_seed, prediction_type=model.prediction_type or "epsilon")
    else:
        check_model_source(model.pretrained_model_name_or_path)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(Path(model.pretrained_model_name_or_path).expanduser())
                if Path(model.pretrained_model_name_or_path).expanduser().exists()
                else model.pretrained_model_name_or_path,
                revision=model.revision,
                variant=model.variant,
                torch_dtype=torch_dtype,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except Exception as err:
            raise ConfigError(
                f"Could not load a Stable Diffusion pipeline from {model.pretrained_model_name_or_path!r}: {err}"
            ) from err
        if model.prediction_type is not None:
            pipe.scheduler.register_to_config(prediction_type=model.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def enable_memory_savers(train: TrainArgs, unet: nn.Module, text_encoder: nn.Module | None = None) -> None:
    """Gradient checkpointing, xformers attention and TF32, as ``train`` asks."""
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True


# --- the output folder ----------------------------------------------------------------------------
def _leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_leaves(value, f"{prefix}{key}."))
    return out


def check_output_dir(
    output_dir: str | Path, config: dict[str, Any], identity: Sequence[str], overwrite: bool
) -> None:
    """Refuse an ``output_dir`` that holds a different run, unless ``overwrite``.

    Two runs are the same when the ``identity`` keys of their configs agree (e.g. model, data,
    adapter and seed): a resumed or extended run may change steps, learning rate or logging.
    A non-empty folder without a run config holds something else and is refused as well.
    """
    folder = Path(output_dir)
    if overwrite or not folder.exists() or not any(folder.iterdir()):
        return
    hint = "choose another train.output_dir or pass train.overwrite_output_dir=true"
    saved_path = folder / RUN_CONFIG_NAME
    if not saved_path.is_file():
        raise ConfigError(f"train.output_dir {folder} is not empty and holds no boft-diffusion run; {hint}")
    from omegaconf import OmegaConf

    saved, current = _leaves(OmegaConf.to_container(OmegaConf.load(saved_path))), _leaves(config)
    keys = [k for k in {**saved, **current} if any(k == i or k.startswith(i + ".") for i in identity)]
    diffs = [k for k in keys if json.dumps(saved.get(k)) != json.dumps(current.get(k))]
    if diffs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in diffs[:3])
        raise ConfigError(f"train.output_dir {folder} holds a different run ({detail}); {hint}")


def prepare_output_dir(train: TrainArgs, config_yaml: str) -> Path:
    """Create ``train.output_dir`` and write the resolved config (main process only).

    With ``overwrite``, a previous run's checkpoints, grids, logs and merged export are removed so
    that ``latest`` and the tracker do not pick them up. Unfinished checkpoint temp folders go too.
    """
    folder = Path(train.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stale = list(folder.glob(".checkpoint-*"))
    if train.overwrite_output_dir:
        logs = folder / train.logging_dir
        stale += [*folder.glob("checkpoint-*"), folder / "validation", logs, folder / "merged"]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
    (folder / RUN_CONFIG_NAME).write_text(config_yaml, encoding="utf-8")
    return folder
