"""Logging: trackers (tensorboard or wandb through accelerate) and the progress bar."""

from __future__ import annotations

from typing import Any

import numpy as np
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["ProgressBar", "flatten_config", "init_trackers", "log_images"]


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"learning_rate": 1e-4}}`` -> ``{"optim.learning_rate": 1e-4}``; lists and None as text
    (tensorboard hparams take only scalars and strings)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def init_trackers(accelerator: Accelerator, project_name: str, config: dict[str, Any]) -> None:
    """Start the configured tracker on the main process (wandb writes into the logging dir)."""
    if accelerator.is_main_process and accelerator.log_with:
        init_kwargs = {"wandb": {"dir": str(accelerator.logging_dir)}}
        accelerator.init_trackers(project_name, config=flatten_config(config), init_kwargs=init_kwargs)


def log_images(accelerator: Accelerator, tag: str, image: Image.Image, step: int, caption: str = "") -> None:
    """Send one image (e.g. a validation grid) to every active tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=caption)]}, step=step)


class ProgressBar:
    """A tqdm bar over optimiser steps with the latest loss and learning rate (main process only)."""

    def __init__(self, accelerator: Accelerator, total: int, initial: int = 0) -> None:
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="Steps",
            disable=not accelerator.is_main_process,
            dynamic_ncols=True,
        )

    def update(self, logs: dict[str, float]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", refresh=False)

    def close(self) -> None:
        self.bar.close()
