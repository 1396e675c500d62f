"""EMA of the trained tensors (``train.ema_decay``): an exponential moving average of every trainable tensor
(BOFT generators and scales, trained biases, ``modules_to_save``, new token rows), updated after each
optimiser step, swapped in for validation and measurement, and saved beside the raw adapter.

Per step ``n`` (counted from 1), as diffusers' ``EMAModel`` does without its power warm-up::

    d_n = min(ema_decay, (1 + n) / (10 + n))         shadow <- d_n * shadow + (1 - d_n) * param

The average is kept in float32, on the parameters' device or on the CPU (``train.ema_on_cpu``: no
accelerator memory, one copy per step). diffusers' ``EMAModel`` is not used because it updates in place on
the parameters' device and skips tensors that need no gradient, so it cannot keep the copy elsewhere.
Its state (the shadow tensors and the step) is saved in checkpoints as safetensors and restored exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["EMA_FILE", "AdapterEMA"]

EMA_FILE = "ema.safetensors"
"""The EMA's state inside a checkpoint folder."""


class AdapterEMA:
    """The moving average of ``params`` (the run's trainable tensors, in a fixed order)."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float, on_cpu: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"an EMA decay is in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.steps = 0
        device = torch.device("cpu") if on_cpu else None
        self.shadow = [
            p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for p in self.params
        ]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average (after an optimiser step)."""
        self.steps += 1
        weight = 1.0 - self.current_decay()
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().to(device=shadow.device, dtype=torch.float32), weight)

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The averaged values in the parameters inside the block, the trained ones back after it."""
        kept = [p.detach().clone() for p in self.params]
        for param, shadow in zip(self.params, self.shadow):
            param.copy_(shadow.to(device=param.device, dtype=param.dtype))
        try:
            yield
        finally:
            for param, value in zip(self.params, kept):
                param.copy_(value)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and metadata of a checkpoint's :data:`EMA_FILE`."""
        tensors = {f"shadow.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)}
        return tensors, {
            "ema": json.dumps({"decay": self.decay, "steps": self.steps, "count": len(self.shadow)})
        }

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Restore what :meth:`state` saved; a state of other tensors is a ``ValueError``."""
        info = json.loads(metadata.get("ema", "{}"))
        if info.get("count") != len(self.shadow) or set(tensors) != {
            f"shadow.{i}" for i in range(len(self.shadow))
        }:
            raise ValueError(f"it averages {info.get('count')} tensors, this run trains {len(self.shadow)}")
        for i, shadow in enumerate(self.shadow):
            saved = tensors[f"shadow.{i}"]
            if saved.shape != shadow.shape:
                raise ValueError(
                    f"averaged tensor {i} has shape {tuple(saved.shape)}, this run's {tuple(shadow.shape)}"
                )
            shadow.copy_(saved)
        self.steps = int(info["steps"])
