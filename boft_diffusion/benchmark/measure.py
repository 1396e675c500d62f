"""One worker's measurements of one method: step time paired with the floor, peak memory, forwards, merges."""

from __future__ import annotations

import contextlib
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..inject import TEXT_ENCODER_TARGETS
from .adapters import Adapter, FloorTaps
from .models import MODEL_SHAPES, ModelInputs, build_model, build_text_encoder, make_inputs, present_targets
from .presets import Method, Preset


class Clock:
    """Wall-clock timing that waits for the device; the recipe's autocast (bf16 on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocations, or this process's peak RSS (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def training_step(
    model: nn.Module, inputs: ModelInputs, optimizer: torch.optim.Optimizer, clock: Clock
) -> torch.Tensor:
    """One recipe step: forward under autocast on inputs that need no gradient, float32 MSE,
    backward, optimizer step, ``zero_grad(set_to_none=True)``. Returns the loss."""
    with clock.autocast():
        out = inputs(model)
    loss = F.mse_loss(out.float(), inputs.target.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def time_training(
    model: nn.Module, adapter: Adapter, taps: FloorTaps, inputs: ModelInputs, preset: Preset, clock: Clock
) -> dict[str, list[float]]:
    """Training step times, and as many floor steps timed in alternation (see the module docstring).

    ``warmup_steps`` untimed steps first (and one untimed floor step). The floor steps give each
    worker its own floor, so the ratio of the two cancels whatever the machine's speed was while
    this worker ran.
    """
    params = adapter.trainable_parameters()
    optimizer = torch.optim.AdamW(params or taps.anchors, lr=1e-4)
    floor_optimizer = torch.optim.AdamW(taps.anchors, lr=1e-4)
    model.train()

    def timed(adapted: bool) -> float:
        adapted = adapted and adapter.trains
        adapter.enable(adapted)
        taps.enable(not adapted)
        opt = optimizer if adapted else floor_optimizer
        return clock.time(lambda: training_step(model, inputs, opt, clock))

    for _ in range(preset.warmup_steps):
        timed(True)
    timed(False)
    times: dict[str, list[float]] = {"step": [], "floor": []}
    for i in range(preset.timed_steps):
        for adapted in (True, False) if i % 2 == 0 else (False, True):
            times["step" if adapted else "floor"].append(timed(adapted))
    adapter.enable(True)
    taps.enable(False)
    return times


@torch.no_grad()
def time_inference(
    model: nn.Module, adapter: Adapter, inputs: ModelInputs, repeats: int, clock: Clock
) -> dict[str, list[float]]:
    """Forward times of the base model (adapter off), the unmerged adapter and the merged one.

    The three are interleaved in one process, so each ratio to the base compares like with like
    (same memory state, same machine load); every forward is preceded by an untimed one.
    """
    model.eval()

    def forward() -> None:
        with clock.autocast():
            inputs(model)

    def timed() -> float:
        forward()
        return clock.time(forward)

    times: dict[str, list[float]] = {"base": [], "unmerged": [], "merged": []}
    for _ in range(repeats):
        adapter.enable(False)
        times["base"].append(timed())
        adapter.enable(True)
        times["unmerged"].append(timed())
        adapter.merge()
        times["merged"].append(timed())
        adapter.unmerge()
    return times


def measure(method: Method, preset: Preset, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Every measurement of one method, in this process (the runner calls it in a fresh worker)."""
    device = torch.device(device)
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(preset, device)  # the only copy of the weights
    targets = present_targets(model, MODEL_SHAPES[preset.shape].targets)
    adapter = Adapter(method, model, targets)
    taps = FloorTaps(model, targets)
    trainable = sum(p.numel() for p in adapter.trainable_parameters())
    inputs = make_inputs(preset, device)
    steps = time_training(model, adapter, taps, inputs, preset, clock)
    peak = peak_memory_bytes(device)  # training peak: measured before anything else is built
    forward = time_inference(model, adapter, inputs, preset.forward_repeats, clock)

    adapters = [adapter]
    if preset.text_encoder is not None:
        text_encoder = build_text_encoder(preset, device)
        adapters.append(Adapter(method, text_encoder, TEXT_ENCODER_TARGETS))
    merge_times = []
    for _ in range(preset.merge_repeats):
        merge_times.append(clock.time(lambda: [a.merge() for a in adapters]))
        for a in adapters:
            a.unmerge()
    return {
        "method": method.key,
        "latent_size": preset.latent_size,
        "input_shape": list(inputs.sample.shape),
        "trainable_params": trainable,
        "step_s": steps["step"],
        "floor_step_s": steps["floor"],
        "peak_memory_bytes": peak,
        "forward_base_s": forward["base"],
        "forward_unmerged_s": forward["unmerged"],
        "forward_merged_s": forward["merged"],
        "merge_s": merge_times if adapter.trains else [],
    }
