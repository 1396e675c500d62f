"""Benchmark: BOFT against PEFT's LoRA and BOFT, and against the no-adapter floor.

    python scripts/benchmark.py --preset sd15 --json bench-sd15.json    # about 10-15 min on 2 CPU cores
    python scripts/benchmark.py --preset sdxl --json bench-sdxl.json    # SDXL-shaped UNet, full width
    python scripts/benchmark.py --preset flux --json bench-flux.json    # Flux-shaped transformer slice
    python scripts/benchmark.py --preset tiny                           # under a minute
    boft-diffusion bench --preset sd15                                  # same, through the CLI

For one model preset (an SD-1.5-, SDXL- or Flux-shaped model with random weights, or the tiny UNet;
see :data:`PRESETS`) each method runs in its own worker process (``python -m boft_diffusion.benchmark --worker ...``), so its peak memory
is its own; repeats are interleaved round-robin across methods so that machine noise hits every
method alike, and the table shows medians. Per method a worker measures:

- training step time: model forward on noisy latents, MSE against a random target, backward, AdamW
  step on the trainable parameters (base frozen). The latents require grad in every method, so
  every method back-propagates through all activations and the no-adapter run is a true floor.
  Each worker alternates its steps with no-adapter steps (adapter switched off), so the ratios to
  the floor are paired within one process and cancel drifts in machine speed between workers;
- peak memory of the training phase (``ru_maxrss`` of the worker; ``max_memory_allocated`` on CUDA);
- unmerged inference (one model forward, adapters live) and merged inference (adapters folded in);
- merge time of every adapter: the model's, plus a CLIP text encoder's where the preset has one;
- trainable parameter count (of the model's adapter).

What differs between model kinds (which class, how its inputs are made and how it is called, which
layers are adapted) is one :class:`Family` per kind; the measurements are the same code for all.
On CUDA everything runs under bf16 autocast; the table is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write_text
from .inject import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS

__all__ = [
    "FAMILIES",
    "METHODS",
    "PRESETS",
    "Family",
    "Method",
    "ModelInputs",
    "Preset",
    "add_arguments",
    "build_model",
    "format_table",
    "main",
    "make_inputs",
    "measure",
    "run",
    "run_benchmark",
    "summarize",
]


@dataclass(frozen=True)
class Preset:
    """A model shape and how long to measure it."""

    name: str
    family: str
    """Key of :data:`FAMILIES`: the model class, how it is fed and called, which layers are adapted."""
    model: dict[str, Any]
    """The family's model config (``UNet2DConditionModel`` or ``FluxTransformer2DModel`` kwargs)."""
    text_encoder: dict[str, Any] | None
    """``CLIPTextConfig`` kwargs of a text encoder whose adapter is merged with the model's (or none)."""
    latent_size: int
    """Side of the latent grid: UNet latents are ``latent_size²``, Flux's packed image tokens too."""
    warmup_steps: int
    timed_steps: int
    forward_repeats: int
    merge_repeats: int
    rounds: int
    """Default number of interleaved rounds (each method runs once per round)."""
    text_tokens: int = 77
    """Length of the text sequence the model attends to."""


SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 1),  # SDXL: (1, 2, 10), and 10 in the mid block
    attention_head_dim=(5, 10, 20),  # diffusers' name for the number of heads: 64-channel heads
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled text embeds (1280) + 6 time ids x 256
    norm_num_groups=32,
)
"""SDXL's UNet config at full width, with one transformer layer per attention block (see ``sdxl``)."""
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2x2
    num_layers=1,  # FLUX.1: 19 double-stream blocks
    num_single_layers=1,  # FLUX.1: 38 single-stream blocks
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""FLUX.1-dev's transformer config at full width (3072), one block of each kind (see ``flux``)."""
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)


def _tiny_preset() -> Preset:
    from .tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG  # (imports diffusers: only when measured)

    return Preset(
        "tiny", "unet", TINY_UNET_CONFIG, {"vocab_size": 49408, **TINY_TEXT_CONFIG}, 16, 2, 3, 3, 2, 1
    )


def _sd15_preset() -> Preset:
    """SD 1.5's UNet (860M parameters) and CLIP-L text encoder, 32×32 latents, batch 1."""
    return Preset("sd15", "unet", SD15_UNET, CLIP_L_TEXT, 32, 2, 3, 3, 3, 2)


def _sdxl_preset() -> Preset:
    """SDXL's UNet at full width, fewer transformer layers: 641M parameters (SDXL: 2.57B).

    Kept from SDXL: block widths (320, 640, 1280), two resnets per down block (three per up block),
    no attention in the first block, 64-channel heads, linear projections, cross-attention on
    2048-wide text states, the ``text_time`` added conditioning (pooled text embeds (B, 1280) and 6
    time ids embedded at 256 = 2816 features). Reduced: ``transformer_layers_per_block`` from
    (1, 2, 10) to (1, 1, 1), and the mid block's from 10 to 1, i.e. 11 transformer blocks instead
    of 70; every attention projection of SDXL's shapes is still there. Inputs: 32×32 latents, batch
    1, 77 text tokens. Merge time includes a CLIP-L text encoder (SDXL's first; not OpenCLIP-bigG).
    """
    return Preset("sdxl", "unet", SDXL_UNET, CLIP_L_TEXT, 32, 1, 3, 2, 2, 1)


def _flux_preset() -> Preset:
    """A FLUX.1-dev transformer slice at full width: 546M parameters (FLUX.1: 11.9B).

    Kept from FLUX.1-dev: width 3072 (24 heads of 128), rotary axes (16, 56, 56), T5-XXL-wide text
    states (4096), CLIP-L pooled projections (768), packed 64-channel latents, guidance embedding.
    Reduced: one double-stream block (FLUX.1: 19) and one single-stream block (FLUX.1: 38).
    Inputs: 256 image tokens (32×32 latents packed 2×2: a 256-px image), 64 text tokens, batch 1.
    Merge time is the transformer's alone (Flux's text encoders are usually not adapted).
    """
    return Preset("flux", "flux", FLUX_TRANSFORMER, None, 16, 1, 3, 2, 2, 1, text_tokens=64)


class _Presets(Mapping[str, Preset]):
    """Presets by name, built on first use (so ``--help`` lists them without importing diffusers)."""

    _builders: dict[str, Callable[[], Preset]] = {
        "sd15": _sd15_preset,
        "sdxl": _sdxl_preset,
        "flux": _flux_preset,
        "tiny": _tiny_preset,
    }

    def __getitem__(self, name: str) -> Preset:
        return self._builders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


PRESETS = _Presets()
"""The model shapes: ``sd15`` (SD-1.5 UNet, CLIP-L), ``sdxl`` (SDXL UNet at full width, fewer
transformer layers), ``flux`` (Flux transformer at full width, one block of each kind) and ``tiny``
(the embedded tiny pipeline's UNet)."""


@dataclass(frozen=True)
class Method:
    """An adapter to measure: ``kind`` is ``none``, ``lora`` / ``peft-boft`` (PEFT) or ``boft`` (ours)."""

    key: str
    label: str
    kind: str
    options: dict[str, int] = field(default_factory=dict)

    def available(self) -> bool:
        return self.kind in ("none", "boft") or find_spec("peft") is not None


METHODS = {
    m.key: m
    for m in (
        Method("floor", "no adapter (floor)", "none"),
        Method("lora", "PEFT LoRA r=8", "lora", {"r": 8}),
        Method("peft-boft", "PEFT BOFT b=8, m=1", "peft-boft", {"b": 8, "m": 1}),
        Method("boft-b8-m1", "BOFT b=8, m=1", "boft", {"b": 8, "m": 1}),
        Method("boft-b8-m2", "BOFT b=8, m=2", "boft", {"b": 8, "m": 2}),
        Method("boft-b4-m4", "BOFT b=4, m=4", "boft", {"b": 4, "m": 4}),
    )
}


# --- models -------------------------------------------------------------------------------------
@torch.no_grad()
def _cheap_init(model: nn.Module, seed: int) -> None:
    """Finite, well-scaled values at memory speed: slices of one random pool, scaled by ``1/sqrt(fan_in)``.

    Timing does not depend on the values, only on them being finite and of sane magnitude (no
    overflow, no denormals); drawing 860M fresh random numbers would take longer than a step.
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.rand(1 << 20, generator=g) * 2 - 1
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.ndim == 1:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        bound = math.sqrt(3.0 / p[0].numel())
        flat = p.view(-1)
        offset = (i * 7919) % pool.numel()
        for start in range(0, flat.numel(), pool.numel()):
            chunk = flat[start : start + pool.numel()]
            src = torch.roll(pool, -offset)[: chunk.numel()] if start == 0 else pool[: chunk.numel()]
            chunk.copy_(src * bound)


@dataclass
class ModelInputs:
    """One batch for one model: the main input, the rest of the call, and a regression target."""

    sample_arg: str
    """Keyword of the main input in the model's call (``sample`` for a UNet, ``hidden_states`` for Flux)."""
    sample: torch.Tensor
    """The main input (noisy latents); training steps pass a grad-enabled copy of it."""
    cond: dict[str, Any]
    """Every other keyword argument: timestep, text states, added conditioning, position ids..."""
    target: torch.Tensor
    """Random target of the output's shape (the training loss is the MSE to it)."""

    def __call__(self, model: nn.Module, sample: torch.Tensor | None = None) -> torch.Tensor:
        """The model's output on ``sample`` (default: :attr:`sample`) and the rest of the batch."""
        sample = self.sample if sample is None else sample
        return model(**{self.sample_arg: sample}, **self.cond, return_dict=False)[0]


Randn = Callable[..., torch.Tensor]


def _unet_inputs(preset: Preset, randn: Randn, device: torch.device) -> ModelInputs:
    """``UNet2DConditionModel`` batch: latents, timestep, text states; SDXL's ``added_cond_kwargs``."""
    config, size = preset.model, preset.latent_size
    sample = randn(1, config.get("in_channels", 4), size, size)
    cond: dict[str, Any] = {
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": randn(1, preset.text_tokens, config["cross_attention_dim"]),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeds ++ embedded time ids
        time_ids = 6
        pooled = (
            config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
        )
        pixels = 8 * size  # original size, crop top-left, target size (in pixels)
        cond["added_cond_kwargs"] = {
            "text_embeds": randn(1, pooled),
            "time_ids": torch.tensor(
                [[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32, device=device
            ),
        }
    target = randn(1, config.get("out_channels", 4), size, size)
    return ModelInputs("sample", sample, cond, target)


def _flux_inputs(preset: Preset, randn: Randn, device: torch.device) -> ModelInputs:
    """``FluxTransformer2DModel`` batch: ``latent_size²`` packed image tokens, text states, pooled
    projections, timestep in [0, 1], guidance, and the rotary position ids of text and image tokens."""
    config, side, text = preset.model, preset.latent_size, preset.text_tokens
    tokens = side * side
    out_channels = (config.get("out_channels") or config["in_channels"]) * config.get("patch_size", 1) ** 2
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(tokens, 3)
    sample = randn(1, tokens, config["in_channels"])
    cond = {
        "encoder_hidden_states": randn(1, text, config["joint_attention_dim"]),
        "pooled_projections": randn(1, config["pooled_projection_dim"]),
        "timestep": torch.tensor([0.5], device=device),
        "img_ids": img_ids.to(device, torch.float32),
        "txt_ids": torch.zeros(text, 3, device=device),
        "guidance": torch.tensor([3.5], device=device) if config.get("guidance_embeds") else None,
    }
    return ModelInputs("hidden_states", sample, cond, randn(1, tokens, out_channels))


@dataclass(frozen=True)
class Family:
    """What the benchmark needs to know about one kind of model; everything else is shared."""

    model_class: str
    """The ``diffusers`` model class."""
    targets: tuple[str, ...]
    """Module-name suffixes that every method adapts (those the model has)."""
    make_inputs: Callable[[Preset, Randn, torch.device], ModelInputs]
    """Builds one batch from a seeded ``randn(*shape)`` that returns tensors on the device."""


FAMILIES = {
    "unet": Family("UNet2DConditionModel", tuple(UNET_ATTENTION_TARGETS), _unet_inputs),
    "flux": Family(
        "FluxTransformer2DModel",
        (*UNET_ATTENTION_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
        _flux_inputs,
    ),
}
"""Model kinds by :attr:`Preset.family`."""


def build_model(preset: Preset, device: torch.device, seed: int = 0) -> nn.Module:
    """The preset's model, built on the meta device and filled by :func:`_cheap_init`, frozen.

    Only one copy of the weights is ever allocated (none on ``device="meta"``, to check shapes).
    """
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, FAMILIES[preset.family].model_class)(**preset.model)
    if device.type == "meta":
        return model.requires_grad_(False)
    if next(model.buffers(), None) is not None:  # buffers would need their real values
        raise RuntimeError(f"{type(model).__name__} with buffers: meta-device construction does not apply")
    model.to_empty(device=device)
    _cheap_init(model, seed)
    return model.requires_grad_(False)


def present_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """The ``targets`` that name at least one module of ``model`` (by suffix, as adapters match them)."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def build_text_encoder(preset: Preset, device: torch.device) -> nn.Module:
    """A CLIP text encoder of the preset's shape (standard init: it is small next to the model)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    assert preset.text_encoder is not None
    return CLIPTextModel(CLIPTextConfig(**preset.text_encoder)).to(device).requires_grad_(False)


def make_inputs(preset: Preset, device: torch.device, seed: int = 0) -> ModelInputs:
    """One seeded batch of the preset's shape, through its family's hook."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return FAMILIES[preset.family].make_inputs(preset, randn, device)


# --- adapters -----------------------------------------------------------------------------------
class Adapter:
    """One method's adapter on one model: add, merge, unmerge (a no-op for the floor)."""

    def __init__(self, method: Method, model: nn.Module, targets: list[str]) -> None:
        self.method = method
        self.model = model
        if method.kind == "boft":
            from .config import BOFTConfig
            from .inject import add_boft

            opts = method.options
            add_boft(
                model,
                BOFTConfig(
                    boft_block_size=opts["b"], boft_n_butterfly_factor=opts["m"], target_modules=targets
                ),
            )
        elif method.kind in ("lora", "peft-boft"):
            import peft

            if method.kind == "lora":
                config = peft.LoraConfig(
                    r=method.options["r"], lora_alpha=method.options["r"], target_modules=targets
                )
            else:
                config = peft.BOFTConfig(
                    boft_block_size=method.options["b"],
                    boft_n_butterfly_factor=method.options["m"],
                    target_modules=targets,
                )
            with _quiet():  # PEFT warns that its CUDA extension is unavailable on CPU
                peft.inject_adapter_in_model(config, model)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name or "boft_" in name)

    def merge(self) -> None:
        if self.method.kind == "boft":
            from .inject import merge_adapters

            merge_adapters(self.model)
        elif self.method.kind != "none":
            for layer in self._peft_layers():
                layer.merge()

    def unmerge(self) -> None:
        if self.method.kind == "boft":
            from .inject import unmerge_adapters

            unmerge_adapters(self.model)
        elif self.method.kind != "none":
            for layer in self._peft_layers():
                layer.unmerge()

    def enable(self, enabled: bool) -> None:
        """Switch the (unmerged) adapter on or off: off is the base model."""
        if self.method.kind == "boft":
            from .inject import set_enabled

            set_enabled(self.model, enabled)
        elif self.method.kind != "none":
            for layer in self._peft_layers():
                layer.enable_adapters(enabled)

    def _peft_layers(self) -> Iterator[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return (m for m in self.model.modules() if isinstance(m, BaseTunerLayer))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        warnings.simplefilter("ignore")
        yield


# --- measurements -------------------------------------------------------------------------------
class Clock:
    """Wall-clock timing that waits for the device; bf16 autocast on CUDA."""

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


def time_training(
    model: nn.Module, adapter: Adapter, inputs: ModelInputs, preset: Preset, clock: Clock
) -> dict[str, list[float]]:
    """Training step times, and as many no-adapter steps (adapter off) timed in alternation.

    ``warmup_steps`` untimed steps first. The no-adapter steps give each worker its own floor, so
    the ratio of the two cancels whatever the machine's speed was while this worker ran.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    sample = inputs.sample.clone().requires_grad_(True)
    model.train()

    def step(adapted: bool) -> None:
        with clock.autocast():
            out = inputs(model, sample)
        loss = F.mse_loss(out.float(), inputs.target)
        loss.backward()
        if adapted and optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sample.grad = None

    def timed(adapted: bool) -> float:
        adapter.enable(adapted)
        return clock.time(lambda: step(adapted))

    for _ in range(preset.warmup_steps):
        timed(True)
    timed(False)
    times: dict[str, list[float]] = {"step": [], "floor": []}
    for i in range(preset.timed_steps):
        for adapted in (True, False) if i % 2 == 0 else (False, True):
            times["step" if adapted else "floor"].append(timed(adapted))
    adapter.enable(True)
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
    adapter = Adapter(method, model, present_targets(model, FAMILIES[preset.family].targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inputs = make_inputs(preset, device)
    steps = time_training(model, adapter, inputs, preset, clock)
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
        "trainable_params": trainable,
        "step_s": steps["step"],
        "floor_step_s": steps["floor"],
        "peak_memory_bytes": peak,
        "forward_base_s": forward["base"],
        "forward_unmerged_s": forward["unmerged"],
        "forward_merged_s": forward["merged"],
        "merge_s": merge_times if method.kind != "none" else [],
    }


# --- runner -------------------------------------------------------------------------------------
def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker_command(method: str, preset: str, device: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "boft_diffusion.benchmark", "--worker", method,
            "--preset", preset, "--device", device, "--worker-out", str(out)]  # fmt: skip


def run_benchmark(
    preset: Preset, methods: list[Method], device: str, rounds: int, log: Callable[[str], None] = print
) -> dict[str, list[dict[str, Any]]]:
    """Run every method once per round in its own process; rounds alternate the method order."""
    results: dict[str, list[dict[str, Any]]] = {m.key: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = methods if r % 2 == 0 else methods[::-1]
            for method in order:
                out = Path(tmp) / f"{method.key}-{r}.json"
                start = time.perf_counter()
                proc = subprocess.run(
                    _worker_command(method.key, preset.name, device, out), capture_output=True, text=True
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"Worker for {method.key} failed:\n{proc.stderr[-4000:]}")
                results[method.key].append(json.loads(out.read_text()))
                log(f"round {r + 1}/{rounds}  {method.label:<22} {time.perf_counter() - start:6.1f} s")
    return results


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _paired_ratio(runs: list[dict[str, Any]], key: str, reference: str) -> float | None:
    """Median over repeats of ``key`` / ``reference`` timed next to it in the same worker."""
    return _median([t / r for run in runs for t, r in zip(run[key], run[reference])])


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians per method: pooled over every timed repeat of every round (memory: over rounds).

    Ratios to the floor pair each measurement with the adapter-off one timed next to it in the
    same worker: a training step with its no-adapter step, a forward with the base forward.
    """
    keys = ("step_s", "floor_step_s", "forward_base_s", "forward_unmerged_s", "forward_merged_s", "merge_s")
    summary = {}
    for key, per_round in runs.items():
        pooled = {k: [v for run in per_round for v in run[k]] for k in keys}
        summary[key] = {
            "label": METHODS[key].label,
            "trainable_params": per_round[0]["trainable_params"],
            "step_s": _median(pooled["step_s"]),
            "floor_step_s": _median(pooled["floor_step_s"]),
            "step_vs_floor": _paired_ratio(per_round, "step_s", "floor_step_s"),
            "peak_memory_gb": _median([run["peak_memory_bytes"] for run in per_round]) / 1e9,
            "forward_base_s": _median(pooled["forward_base_s"]),
            "forward_unmerged_s": _median(pooled["forward_unmerged_s"]),
            "forward_merged_s": _median(pooled["forward_merged_s"]),
            "unmerged_vs_base": _paired_ratio(per_round, "forward_unmerged_s", "forward_base_s"),
            "merged_vs_base": _paired_ratio(per_round, "forward_merged_s", "forward_base_s"),
            "merge_s": _median(pooled["merge_s"]),
            "samples": {k: len(v) for k, v in pooled.items()},
        }
    return summary


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


TABLE_NOTE = (
    "Step ratios are paired: every worker also times no-adapter steps (adapter switched off) between "
    "its own, × floor is the median of step / that step, × LoRA divides by LoRA's × floor; × base "
    "likewise pairs each forward with an adapter-off forward. Memory: peak of the training phase."
)


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown table: absolute figures and ratios against LoRA and against the floor (see ``TABLE_NOTE``)."""
    lora = summary.get("lora", {})

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    head = ("| method | trainable params | s/step | × LoRA | × floor | peak mem (GB) | × LoRA "
            "| unmerged fwd (s) | × base | merged fwd (s) | × base | merge (s) |")  # fmt: skip
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for s in summary.values():
        lines.append("| " + " | ".join([
            s["label"], f"{s['trainable_params']:,}",
            cell(s["step_s"], ".2f"), cell(_ratio(s["step_vs_floor"], lora.get("step_vs_floor")), ".2f"),
            cell(s["step_vs_floor"], ".2f"),
            cell(s["peak_memory_gb"], ".2f"), cell(_ratio(s["peak_memory_gb"], lora.get("peak_memory_gb")), ".2f"),
            cell(s["forward_unmerged_s"], ".2f"), cell(s["unmerged_vs_base"], ".2f"),
            cell(s["forward_merged_s"], ".2f"), cell(s["merged_vs_base"], ".2f"),
            cell(s["merge_s"], ".2f"),
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``scripts/benchmark.py`` and ``boft-diffusion bench``."""
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="model shape (default: tiny)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=None,
        help="methods to run (default: all available; PEFT ones need peft installed)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: the preset's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--json", type=Path, default=None, help="write raw and summarised results here")


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(args: argparse.Namespace) -> int:
    """Run the benchmark as ``args`` say; print the table; write JSON if asked."""
    preset = PRESETS[args.preset]
    methods = [METHODS[k] for k in (args.methods or METHODS)]
    skipped = [m.key for m in methods if not m.available()]
    methods = [m for m in methods if m.available()]
    if skipped:
        print(f"skipping {skipped}: peft is not installed")
    device = _resolve_device(args.device)
    rounds = args.rounds or preset.rounds
    print(f"preset {preset.name}, device {device}, {available_cores()} threads, {rounds} round(s)")
    start = time.perf_counter()
    runs = run_benchmark(preset, methods, device, rounds)
    summary = summarize(runs)
    print()
    print(format_table(summary))
    print(f"\n{TABLE_NOTE}")
    elapsed = time.perf_counter() - start
    print(f"\ntotal {elapsed:.0f} s")
    if args.json is not None:
        report = {
            "preset": dataclasses.asdict(preset),
            "device": device,
            "threads": available_cores(),
            "rounds": rounds,
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
            "elapsed_s": elapsed,
            "summary": summary,
            "runs": runs,
        }
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="benchmark worker: one method, one process")
    parser.add_argument("--worker", required=True, choices=list(METHODS))
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker-out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(available_cores())
    result = measure(METHODS[args.worker], PRESETS[args.preset], args.device)
    atomic_write_text(args.worker_out, json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return _worker(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
