"""Optimiser and learning-rate schedule for the trained (BOFT) parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .args import ConfigError, OptimArgs

__all__ = ["make_lr_scheduler", "make_optimizer", "trainable_parameters"]


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
    params: list[nn.Parameter], optim: OptimArgs, learning_rate: float
) -> torch.optim.Optimizer:
    """AdamW (torch), or bitsandbytes' 8-bit AdamW for ``optimizer=adamw_8bit``."""
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
