"""Step bookkeeping shared by the recipes' training loops: how many steps and epochs, where a
resumed run picks up, the batches of one epoch, and the guards that stop a run that cannot go on
(a non-finite loss or parameter, Ctrl-C)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from .sharding import local_tensor, on_any_process

__all__ = [
    "LossMeter",
    "StepPlan",
    "TrainingDiverged",
    "TrainingError",
    "TrainingInterrupted",
    "check_finite_loss",
    "check_finite_parameters",
    "epoch_batches",
    "first_nonfinite",
    "is_due",
]


class TrainingError(RuntimeError):
    """A run that cannot go on (it diverged, a checkpoint could not be written); the message is one
    line for the user: what happened, where, and what was kept."""


class TrainingDiverged(TrainingError):
    """A loss or trained tensor became NaN or infinite; nothing was saved in that state."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the last checkpoint is and how to resume."""


@dataclass(frozen=True)
class StepPlan:
    """Optimiser steps of a run: ``updates_per_epoch = ceil(batches per process / accumulation)``."""

    max_train_steps: int
    num_epochs: int
    updates_per_epoch: int
    gradient_accumulation_steps: int

    @classmethod
    def create(
        cls,
        batches_per_process: int,
        gradient_accumulation_steps: int,
        max_train_steps: int | None,
        num_train_epochs: int,
    ) -> StepPlan:
        per_epoch = max(1, math.ceil(batches_per_process / gradient_accumulation_steps))
        steps = max_train_steps if max_train_steps is not None else num_train_epochs * per_epoch
        return cls(steps, math.ceil(steps / per_epoch), per_epoch, gradient_accumulation_steps)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, micro-batches of that epoch already consumed)`` after ``step`` optimiser steps."""
        epoch, done = divmod(step, self.updates_per_epoch)
        return epoch, done * self.gradient_accumulation_steps


def epoch_batches(
    accelerator: Accelerator, dataloader: Any, epoch: int, skip: int = 0, epoch_aware: Iterable[Any] = ()
) -> Any:
    """The (prepared) dataloader for ``epoch``, without its first ``skip`` batches.

    ``epoch_aware`` objects (sampler, dataset) get ``set_epoch(epoch)`` so that order and
    augmentation depend on the epoch only, not on how the run got there.
    """
    for obj in epoch_aware:
        obj.set_epoch(epoch)
    loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return loader


def is_due(step: int, every: int) -> bool:
    """True every ``every`` steps (never when ``every`` is 0)."""
    return every > 0 and step % every == 0


class LossMeter:
    """Mean of the micro-batch losses of one optimiser step, averaged over processes."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def pop(self, accelerator: Accelerator) -> float:
        """The mean so far (all processes must call this together); resets the meter."""
        mean = accelerator.reduce(self.total / self.count, reduction="mean")
        self.total, self.count = None, 0
        return float(mean.item())


# --- guards ---------------------------------------------------------------------------------------
def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, else None (one device sync)."""
    named = [(name, t) for name, t in named if t.is_floating_point()]
    if not named:
        return None
    bad = torch.stack([~torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    return named[int(bad.nonzero()[0])][0] if bool(bad.any()) else None


def check_finite_loss(loss: float, step: int) -> None:
    """Raise :class:`TrainingDiverged` if the step's loss (already averaged over micro-batches and
    processes, so every process sees the same value and all of them stop) is NaN or inf.
    ``step``: the step being computed."""
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"Training diverged at step {step}: the loss is {loss} (lower optim.learning_rate or set "
            "optim.max_grad_norm); nothing of this step was saved"
        )


def check_finite_parameters(
    components: Mapping[str, nn.Module], step: int, accelerator: Accelerator | None = None
) -> None:
    """Raise :class:`TrainingDiverged` naming the first trained parameter that is NaN or inf after
    the optimiser step ``step``. Parameters are identical on every process, or (sharded, with
    ``accelerator``) each process checks its shards and all of them agree, so every process stops."""
    named = (
        (f"{comp}.{name}", local_tensor(param))
        for comp, module in components.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    )
    bad = first_nonfinite(named)
    if accelerator is not None and on_any_process(accelerator, bad is not None) and bad is None:
        bad = "shard of another process"
    if bad is not None:
        raise TrainingDiverged(
            f"Training diverged at step {step}: the parameter {bad} is NaN or inf after the optimiser "
            "step (lower optim.learning_rate or set optim.max_grad_norm); nothing of this step was saved"
        )
