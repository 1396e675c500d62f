"""Optimiser and learning-rate schedule for the trained (BOFT) parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .args import ConfigError, OptimArgs, TrainArgs

__all__ = ["make_lr_scheduler", "make_optimizer", "schedule_keys", "trainable_parameters"]

_DECAYING = ("linear", "cosine", "cosine_with_restarts", "polynomial")
"""Schedules whose value at a step depends on the run's total number of steps."""


def trainable_parameters(modules: Iterable[nn.Module | None]) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` across ``modules``, each once."""
    seen, params = set(), []
    for module in modules:
        for param in () if module is None else module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def make_optimizer(
    params: list[nn.Parameter] | list[dict[str, Any]], optim: OptimArgs, learning_rate: float
) -> torch.optim.Optimizer:
    """AdamW (torch), or bitsandbytes' 8-bit AdamW for ``optimizer=adamw_8bit``; ``params`` may be parameter
    groups (dicts whose options override the config's)."""
    if not params:
        raise ConfigError("Nothing to train: no parameter requires grad (check the BOFT target modules)")
    if optim.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError(
                "optim.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes"
            ) from err
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        weight_decay=optim.adam_weight_decay,
        eps=optim.adam_epsilon,
    )


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimArgs, max_train_steps: int, num_processes: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """``diffusers.optimization.get_scheduler`` over ``max_train_steps`` optimiser steps.

    Accelerate steps a prepared scheduler once per process per optimiser step, hence the
    ``num_processes`` factor on both warmup and total steps (as in diffusers' scripts).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=optim.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=optim.lr_num_cycles,
        power=optim.lr_power,
    )


def schedule_keys(optim: OptimArgs, train: TrainArgs, total_steps: int | None = None) -> dict[str, Any]:
    """The config values the optimiser's and schedule's state were built from, by dotted key.

    A resumed run restores that state (learning rate, betas, decay and the schedule's base rates
    and position live in it), so it would silently keep an old value of any of these keys: a
    checkpoint records them and a resume must not change them. Only the keys the chosen schedule
    reads are listed (e.g. ``train.max_train_steps`` for a decaying schedule, not for ``constant``,
    so a constant-rate run may be extended). ``total_steps``, the resolved schedule length, is
    added for decaying schedules when known (it also depends on the data size with epochs).
    """
    keys: dict[str, Any] = {
        f"optim.{k}": getattr(optim, k)
        for k in ("optimizer", "learning_rate", "scale_lr", "lr_scheduler")
        + ("adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon")
    }
    if optim.scale_lr:  # the rate is multiplied by these (and the number of processes)
        keys["train.train_batch_size"] = train.train_batch_size
        keys["train.gradient_accumulation_steps"] = train.gradient_accumulation_steps
    name = optim.lr_scheduler
    if name != "constant":
        keys["optim.lr_warmup_steps"] = optim.lr_warmup_steps
    if name == "cosine_with_restarts":
        keys["optim.lr_num_cycles"] = optim.lr_num_cycles
    if name == "polynomial":
        keys["optim.lr_power"] = optim.lr_power
    if name in _DECAYING:
        keys["train.max_train_steps"] = train.max_train_steps
        if train.max_train_steps is None:
            keys["train.num_train_epochs"] = train.num_train_epochs
        if total_steps is not None:
            keys["train.max_train_steps (resolved)"] = total_steps
    return keys
