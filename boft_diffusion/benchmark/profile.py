"""One adapted projection profiled by cost category (Cayley solve, permutation, block product, copies, base matmul)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .adapters import Adapter
from .measure import Clock
from .presets import METHODS, Method, Preset

PROFILE_CATEGORIES = (
    "Cayley (solve)",
    "permutation",
    "block product",
    "layout copies",
    "base matmul",
    "autograd overhead",
    "other",
)
"""Categories of :func:`profile_layer`, in the order printed."""

_CAYLEY_REGIONS = ("boft::block_rotations", "boft::cayley", "PackedCayley")
_OPS = {
    "permutation": {"aten::index_select", "aten::gather", "aten::take", "aten::index", "aten::scatter",
                    "aten::index_add_", "aten::index_copy_", "aten::index_put_", "aten::_index_put_impl_"},
    "block product": {"aten::bmm", "aten::baddbmm", "aten::einsum"},
    "layout copies": {"aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy", "aten::to",
                      "aten::empty_like", "aten::empty_strided", "aten::empty"},
    "base matmul": {"aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::_addmm_activation"},
}  # fmt: skip


def profile_category(name: str, ancestors: list[str]) -> str:
    """The category of a profiler event from its name and its ancestors' (innermost first).

    Cayley: anything inside the Cayley transform (our ``block_rotations``, forward and backward) and
    any ``aten::linalg_*`` (PEFT builds its Cayley by ``linalg.solve`` / ``inv``); the rest by aten
    op: gathers are permutations, batched matmuls block products, copies and casts layout copies,
    dense 2-D matmuls the base matmul (and LoRA's two low-rank ones); autograd engine and backward
    nodes' and custom autograd Functions' own (Python) time is autograd overhead.
    """
    if name.startswith("aten::linalg_") or any(r in n for n in (name, *ancestors) for r in _CAYLEY_REGIONS):
        return "Cayley (solve)"
    for category, ops in _OPS.items():
        if name in ops:
            return category
    custom_function = name.lstrip("_")[:1].isupper()  # an autograd.Function's own (Python) time
    if name.startswith("autograd::") or "Backward" in name or custom_function:
        return "autograd overhead"
    return "other"


def profile_shape(preset: Preset) -> tuple[int, int]:
    """``(tokens, width)`` of the preset's first adapted attention projection: a UNet's first
    cross-attention block (its widest token count), Flux's image-token projections."""
    config = preset.model
    if preset.shape == "flux":
        return preset.latent_size**2, config["num_attention_heads"] * config["attention_head_dim"]
    level = next(i for i, kind in enumerate(config["down_block_types"]) if "CrossAttn" in kind)
    side = max(1, preset.latent_size // 2**level)
    return side * side, config["block_out_channels"][level]


class _Projection(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)


@contextlib.contextmanager
def _labelled_functional() -> Iterator[None]:
    """Wrap the :mod:`.functional` functions that :mod:`.layers` calls in ``record_function`` labels
    (``boft::<name>``) for the duration; restored after."""
    from torch.profiler import record_function

    from .. import functional, layers

    def labelled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with record_function(f"boft::{name}"):
                return fn(*args, **kwargs)

        return call

    patched = {
        name: getattr(layers, name)
        for name in functional.__all__
        if getattr(layers, name, None) is getattr(functional, name)
    }
    try:
        for name, fn in patched.items():
            setattr(layers, name, labelled(name, fn))
        yield
    finally:
        for name, fn in patched.items():
            setattr(layers, name, fn)


def _profile_method(
    method: Method, tokens: int, width: int, device: torch.device, steps: int
) -> dict[str, Any]:
    """Self time per category (ms per step) of ``steps`` forward + backward of one adapted projection."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    module = _Projection(width).to(device).requires_grad_(False)
    Adapter(method, module, ["proj"])
    module.train()
    clock = Clock(device)
    # A layer inside the network: its input needs a gradient (for the layers below it).
    x = torch.randn(tokens, width, device=device, requires_grad=True)

    def step() -> None:
        with clock.autocast():
            out = module.proj(x)
        out.float().square().mean().backward()
        x.grad = None
        for p in module.parameters():
            p.grad = None

    for _ in range(3):
        step()
    clock.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _labelled_functional(), profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        clock.sync()
    cpu = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    dev = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    for event in prof.events():
        if event.device_type != DeviceType.CPU:  # kernels: counted in their launching op's device time
            continue
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        category = profile_category(event.name, ancestors)
        cpu[category] += event.self_cpu_time_total / 1e3 / steps
        dev[category] += getattr(event, "self_device_time_total", 0.0) / 1e3 / steps
    result = {"label": method.label, "cpu_ms": cpu}
    if device.type == "cuda":
        result["device_ms"] = dev
    return result


def profile_layer(preset: Preset, device: torch.device | str = "cpu", steps: int = 5) -> dict[str, Any]:
    """Profile one adapted attention projection of the preset's width and token count (see
    :func:`profile_shape`): BOFT b=8, m=2 against PEFT's LoRA r=8 (when peft is installed), self
    time by :data:`PROFILE_CATEGORIES`, in ms per forward + backward."""
    device = torch.device(device)
    tokens, width = profile_shape(preset)
    methods = [METHODS["boft-b8-m2"]] + ([METHODS["lora"]] if METHODS["lora"].available() else [])
    return {
        "tokens": tokens,
        "width": width,
        "device": device.type,
        "steps": steps,
        "methods": {m.key: _profile_method(m, tokens, width, device, steps) for m in methods},
    }


def format_profile(profile: dict[str, Any]) -> str:
    """Markdown table of :func:`profile_layer`: ms per step and share of the total, per category."""
    methods = list(profile["methods"].values())
    clocks = ["cpu_ms"] + (["device_ms"] if profile["device"] == "cuda" else [])
    head = "| category |" + "".join(
        f" {m['label']} {'CPU' if c == 'cpu_ms' else 'device'} ms | share |" for m in methods for c in clocks
    )
    lines = [
        f"Per-layer profile: one {profile['width']}-wide projection on {profile['tokens']} tokens, "
        f"forward + backward, {profile['device']}, self time per step (mean of {profile['steps']})",
        "",
        head,
        "|---|" + "---|---|" * (len(methods) * len(clocks)),
    ]
    for category in (*PROFILE_CATEGORIES, "total"):
        cells = []
        for m in methods:
            for c in clocks:
                total = sum(m[c].values())
                value = total if category == "total" else m[c][category]
                share = value / total if total else 0.0
                cells += [f"{value:.3f}", f"{share:.0%}"]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
