"""Benchmark: BOFT against PEFT's LoRA, BOFT and OFT (and LyCORIS' BOFT), and against the floor.

    python scripts/benchmark.py --preset sd15 --json bench-sd15.json    # about 10-15 min on 2 CPU cores
    python scripts/benchmark.py --preset sd15 --latent-size 64          # 512-px latents (4096 tokens)
    python scripts/benchmark.py --preset sdxl --json bench-sdxl.json    # SDXL-shaped UNet, full width
    python scripts/benchmark.py --preset flux --json bench-flux.json    # Flux-shaped transformer slice
    python scripts/benchmark.py --preset tiny                           # under a minute
    python scripts/benchmark.py --preset sd15 --profile                 # one layer, by cost category
    boft-diffusion bench --preset sd15                                  # same, through the CLI

For one model preset (an SD-1.5-, SDXL- or Flux-shaped model with random weights, or the tiny UNet;
see :data:`PRESETS`; ``--latent-size`` overrides its latent side, and so its token count) each
method runs in its own worker process (``python -m boft_diffusion.benchmark --worker ...``), so its
peak memory is its own; ``--rounds`` interleave the methods round-robin (alternating the order) so
that machine noise hits every method alike. Per method a worker measures:

- training step time, the step of the training recipes: forward under the recipe's autocast (bf16
  on CUDA, none on the CPU) on noisy latents that do *not* require a gradient (they are inputs, not
  parameters), MSE against a random target in float32, backward, AdamW step on the adapter's
  parameters (base frozen), ``zero_grad(set_to_none=True)``;
- the floor step, timed in alternation with it in the same worker (paired, so the ratio cancels
  drifts in machine speed between workers). **The floor is the cheapest step any adapter of the
  same layers could have**: the adapter is switched off and every adapted layer's output instead
  goes through a zero-cost tap, an identity autograd node tied to a trainable scalar (no
  arithmetic; its gradient is not even formed). Autograd therefore runs the same backward an
  adapter forces (activation gradients from the loss down to the earliest adapted layer, never
  the frozen weights' gradients, nothing below that layer), and the optimizer step updates nothing.
  What a method costs above the floor is what its own parameters cost; the ``floor`` method runs
  the tapped step on both sides (its "× floor" shows the noise of the pairing);
- peak memory of the training phase (``ru_maxrss`` of the worker; ``max_memory_allocated`` on CUDA);
- unmerged inference (one model forward, adapters live) and merged inference (adapters folded in),
  each paired with a base forward (adapter off);
- merge time of every adapter: the model's, plus a CLIP text encoder's where the preset has one;
- trainable parameter count (of the model's adapter).

Every ratio (step × floor, step × LoRA, memory × LoRA, forward × base) is reported as its median
with its spread: per round, the median of that worker's paired ratios (against LoRA: divided by
LoRA's of the same round); the table shows the median over rounds and, in parentheses, the lowest
and highest round (with a single round: the lowest and highest paired repeat). The column
"≤ bar" says whether the step × LoRA is under ``--bar`` for the whole spread (``yes``), above it
for the whole spread (``no``) or straddles it (``unclear``): a claim is made only where the spread
allows it.

``--profile`` instead profiles one adapted attention projection of the preset's width and token
count (forward and backward of BOFT b=8, m=2 and LoRA r=8) with ``torch.profiler`` and prints its
time by category (Cayley solve, permutation, block product, layout copies, base matmul, autograd
overhead, other): see :func:`profile_layer`.

What differs between model shapes (which class, how its inputs are made and how it is called, which
layers are adapted) is one :class:`ModelShape` each; the measurements are the same code for all. (Not a
model family of :mod:`boft_diffusion.families`: the benchmark builds bare denoisers, no pipelines.)
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
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    "DEFAULT_BAR",
    "METHODS",
    "MODEL_SHAPES",
    "ModelShape",
    "PRESETS",
    "PROFILE_CATEGORIES",
    "FloorTaps",
    "Method",
    "ModelInputs",
    "Preset",
    "benchmark_report",
    "build_model",
    "format_profile",
    "format_report",
    "format_table",
    "lora_rank_for",
    "lora_width",
    "main",
    "make_inputs",
    "measure",
    "profile_layer",
    "ratio_spread",
    "run_benchmark",
    "summarize",
    "training_step",
    "verdict",
    "with_overrides",
]


@dataclass(frozen=True)
class Preset:
    """A model shape and how long to measure it."""

    name: str
    shape: str
    """Key of :data:`MODEL_SHAPES`: the model class, how it is fed and called, which layers are adapted."""
    model: dict[str, Any]
    """The model's config (``UNet2DConditionModel`` or ``FluxTransformer2DModel`` kwargs)."""
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
    """An adapter to measure: ``kind`` is ``none`` (the floor), ``boft`` (ours), ``lora`` /
    ``peft-boft`` / ``peft-oft`` (PEFT) or ``lycoris-boft`` (LyCORIS)."""

    key: str
    label: str
    kind: str
    options: dict[str, int] = field(default_factory=dict)

    def unavailable_reason(self) -> str | None:
        """Why this method cannot run here (a missing package), or ``None`` when it can."""
        if self.kind in ("lora", "peft-boft", "peft-oft") and find_spec("peft") is None:
            return "the peft package is not installed (pip install peft)"
        if self.kind == "lycoris-boft" and find_spec("lycoris") is None:
            return "the lycoris package is not installed (pip install lycoris-lora)"
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None


METHODS = {
    m.key: m
    for m in (
        Method("floor", "no adapter (floor)", "none"),
        Method("lora", "PEFT LoRA r=8", "lora", {"r": 8}),
        Method("peft-boft", "PEFT BOFT b=8, m=1", "peft-boft", {"b": 8, "m": 1}),
        Method("peft-oft", "PEFT OFT b=32", "peft-oft", {"b": 32}),
        # LyCORIS picks the block size from a factor: the largest even b <= factor with d / b a
        # power of two (SD widths 320 / 640 / 1280: b = 10; no b <= 8 divides them that way).
        Method("lycoris-boft", "LyCORIS BOFT factor 10", "lycoris-boft", {"b": 10}),
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
    """The main input (noisy latents); it never requires a gradient (an input, not a parameter)."""
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
class ModelShape:
    """What the benchmark needs to know about one kind of bare denoiser; everything else is shared."""

    model_class: str
    """The ``diffusers`` model class."""
    targets: tuple[str, ...]
    """Module-name suffixes that every method adapts (those the model has)."""
    make_inputs: Callable[[Preset, Randn, torch.device], ModelInputs]
    """Builds one batch from a seeded ``randn(*shape)`` that returns tensors on the device."""


MODEL_SHAPES = {
    "unet": ModelShape("UNet2DConditionModel", tuple(UNET_ATTENTION_TARGETS), _unet_inputs),
    "flux": ModelShape(
        "FluxTransformer2DModel",
        (*UNET_ATTENTION_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
        _flux_inputs,
    ),
}
"""Model shapes by :attr:`Preset.shape`."""


def build_model(preset: Preset, device: torch.device, seed: int = 0) -> nn.Module:
    """The preset's model, built on the meta device and filled by :func:`_cheap_init`, frozen.

    Only one copy of the weights is ever allocated (none on ``device="meta"``, to check shapes).
    """
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, MODEL_SHAPES[preset.shape].model_class)(**preset.model)
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
    """One seeded batch of the preset's shape, through its model shape's hook."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return MODEL_SHAPES[preset.shape].make_inputs(preset, randn, device)


def with_overrides(
    preset: Preset,
    latent_size: int | None = None,
    timed_steps: int | None = None,
    forward_repeats: int | None = None,
) -> Preset:
    """The preset with another latent side (UNet: ``N × N`` latents; Flux: ``N²`` image tokens),
    number of timed steps or of timed forward passes per kind (``None`` keeps the preset's)."""
    changes: dict[str, int] = {}
    if latent_size is not None:
        if latent_size < 1:
            raise ValueError(f"--latent-size must be positive, got {latent_size}")
        changes["latent_size"] = latent_size
    if timed_steps is not None:
        if timed_steps < 1:
            raise ValueError(f"--timed-steps must be positive, got {timed_steps}")
        changes["timed_steps"] = timed_steps
    if forward_repeats is not None:
        if forward_repeats < 1:
            raise ValueError(f"--forward-repeats must be positive, got {forward_repeats}")
        changes["forward_repeats"] = forward_repeats
    return dataclasses.replace(preset, **changes) if changes else preset


# --- adapters -----------------------------------------------------------------------------------
class Adapter:
    """One method's adapter on one model: add, switch on and off, merge, unmerge (no-ops for the floor)."""

    def __init__(self, method: Method, model: nn.Module, targets: list[str]) -> None:
        self.method = method
        self.model = model
        self.targets = list(targets)
        self._lycoris: Any = None
        self._lycoris_applied = False
        self._saved_weights: dict[str, torch.Tensor] = {}
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
        elif method.kind in ("lora", "peft-boft", "peft-oft"):
            self._add_peft(targets)
        elif method.kind == "lycoris-boft":
            self._add_lycoris(targets)

    def _add_peft(self, targets: list[str]) -> None:
        import peft

        opts = self.method.options
        if self.method.kind == "lora":
            config: Any = peft.LoraConfig(r=opts["r"], lora_alpha=opts["r"], target_modules=targets)
        elif self.method.kind == "peft-boft":
            config = peft.BOFTConfig(
                boft_block_size=opts["b"], boft_n_butterfly_factor=opts["m"], target_modules=targets
            )
        else:  # OFT v2 (PEFT >= 0.17): block size given, rank derived; Cayley-Neumann by default
            config = peft.OFTConfig(r=0, oft_block_size=opts["b"], target_modules=targets)
        with _quiet():  # PEFT warns that its CUDA extension is unavailable on CPU
            peft.inject_adapter_in_model(config, self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(tag in name for tag in ("lora_", "boft_", "oft_")))

    def _add_lycoris(self, targets: list[str]) -> None:
        """LyCORIS' BOFT (``algo="boft"``, block factor ``b``) on exactly the modules ``targets`` names.

        ``create_lycoris`` would apply LyCORIS' ``full`` preset (every linear and conv of each
        transformer and resnet block), so the network is built directly after a preset naming only
        the adapted projections. LyCORIS derives its butterfly depth from the width (``log2(d / b)``
        factors), so the row is its own default configuration at that block factor.
        """
        import re

        from lycoris import LycorisNetwork

        LycorisNetwork.apply_preset(
            {
                "enable_conv": False,
                "target_module": [],
                "target_name": [".*" + re.escape("." + t) + "$" for t in targets]
                + [re.escape(t) + "$" for t in targets],
                "module_algo_map": {},
                "name_algo_map": {},
                "use_fnmatch": False,
                "exclude_name": [],
            }
        )
        with _quiet():
            net = LycorisNetwork(
                self.model,
                multiplier=1.0,
                lora_dim=self.method.options["b"],
                alpha=1.0,
                network_module="boft",
            )
        net.apply_to()
        net.requires_grad_(True)
        self._lycoris, self._lycoris_applied = net, True

    def _apply_lycoris(self, applied: bool) -> None:
        """Hook LyCORIS' modules in or out (its ``apply_to`` on hooked modules would wrap them twice)."""
        if applied != self._lycoris_applied:
            self._lycoris.apply_to() if applied else self._lycoris.restore()
            self._lycoris_applied = applied

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer steps (the model's that require grad; LyCORIS' own)."""
        if self._lycoris is not None:
            return [p for p in self._lycoris.parameters() if p.requires_grad]
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def trains(self) -> bool:
        """Whether there is an adapter to train (the floor has none)."""
        return self.method.kind != "none"

    def merge(self) -> None:
        if self.method.kind == "boft":
            from .inject import merge_adapters

            merge_adapters(self.model)
        elif self.method.kind == "lycoris-boft":
            self._saved_weights = {k: v.clone() for k, v in self.model.state_dict().items()}
            self._apply_lycoris(False)
            self._lycoris.merge_to(1.0)
        elif self.method.kind != "none":
            for layer in self._peft_layers():
                layer.merge()

    def unmerge(self) -> None:
        if self.method.kind == "boft":
            from .inject import unmerge_adapters

            unmerge_adapters(self.model)
        elif self.method.kind == "lycoris-boft":  # LyCORIS merges in place: restore the saved weights
            self.model.load_state_dict(self._saved_weights)
            self._saved_weights = {}
            self._apply_lycoris(True)
        elif self.method.kind != "none":
            for layer in self._peft_layers():
                layer.unmerge()

    def enable(self, enabled: bool) -> None:
        """Switch the (unmerged) adapter on or off: off is the base model."""
        if self.method.kind == "boft":
            from .inject import set_enabled

            set_enabled(self.model, enabled)
        elif self.method.kind == "lycoris-boft":
            self._apply_lycoris(enabled)
        elif self.method.kind != "none":
            for layer in self._peft_layers():
                layer.enable_adapters(enabled)

    def _peft_layers(self) -> Iterator[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return (m for m in self.model.modules() if isinstance(m, BaseTunerLayer))


def lora_width(layer: nn.Module) -> int:
    """Parameters per unit of LoRA rank on ``layer``: ``d_in + d_out`` for a Linear; for a Conv2d, PEFT's
    ``lora_A`` is a conv of the layer's kernel (``in_channels * k_h * k_w`` per rank) and ``lora_B`` a 1 x 1
    conv (``out_channels``)."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels // layer.groups * math.prod(layer.kernel_size) + layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features + layer.out_features
    raise TypeError(f"LoRA's width is defined here for Linear and Conv2d layers, not {type(layer).__name__}")


def lora_rank_for(layers: Iterable[nn.Module], budget: int) -> int:
    """The LoRA rank (at least 1) whose factors on ``layers`` hold closest to ``budget`` parameters: the
    rank that matches another adapter's trainable count in a comparison (a rank-r pair holds
    ``r * lora_width``)."""
    per_rank = sum(map(lora_width, layers))
    if per_rank == 0:
        raise ValueError("no layers to size a LoRA rank for")
    return max(1, round(budget / per_rank))


class _Tap(torch.autograd.Function):
    """Identity on a layer's output, tied to a trainable scalar: no arithmetic, one graph node.

    It makes autograd reach the layer (and so every layer between it and the loss) the way an
    adapter there would; its own gradient is never formed (``None``).
    """

    @staticmethod
    def forward(ctx, output, anchor):  # noqa: D102
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


class FloorTaps:
    """Zero-cost taps on the adapted layers: the floor step (see the module docstring).

    One forward hook per module whose name ends with a target (the adapter's wrapper where there is
    one: switched off it is the base layer); active only while :meth:`enable`\\ d and grad is on.
    """

    def __init__(self, model: nn.Module, targets: list[str]) -> None:
        modules = [
            m
            for name, m in model.named_modules()
            if any(name == t or name.endswith("." + t) for t in targets)
        ]
        device = next(model.parameters()).device
        self.anchors = [nn.Parameter(torch.zeros((), device=device)) for _ in modules]
        self.enabled = False
        for module, anchor in zip(modules, self.anchors):
            module.register_forward_hook(self._hook(anchor))

    def _hook(self, anchor: nn.Parameter) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.enabled and torch.is_grad_enabled() and isinstance(output, torch.Tensor):
                return _Tap.apply(output, anchor)
            return None

        return hook

    def enable(self, enabled: bool) -> None:
        self.enabled = enabled


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        warnings.simplefilter("ignore")
        yield


# --- measurements -------------------------------------------------------------------------------
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


# --- runner -------------------------------------------------------------------------------------
def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker_command(method: str, preset: Preset, device: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "boft_diffusion.benchmark", "--worker", method,
            "--preset", preset.name, "--latent-size", str(preset.latent_size),
            "--timed-steps", str(preset.timed_steps), "--forward-repeats", str(preset.forward_repeats),
            "--device", device, "--worker-out", str(out)]  # fmt: skip


def run_benchmark(
    preset: Preset,
    methods: list[Method],
    device: str,
    rounds: int,
    log: Callable[[str], None] = print,
    failed: dict[str, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run every method once per round in its own process; rounds alternate the method order.

    A worker that fails drops its method from the results and from later rounds (its last error
    line goes into ``failed``, by key); the other methods' measurements are kept.
    """
    failed = {} if failed is None else failed
    results: dict[str, list[dict[str, Any]]] = {m.key: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = methods if r % 2 == 0 else methods[::-1]
            for method in (m for m in order if m.key not in failed):
                out = Path(tmp) / f"{method.key}-{r}.json"
                start = time.perf_counter()
                proc = subprocess.run(
                    _worker_command(method.key, preset, device, out), capture_output=True, text=True
                )
                if proc.returncode != 0:
                    lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
                    failed[method.key] = lines[-1]
                    del results[method.key]
                    log(f"round {r + 1}/{rounds}  {method.label:<22} FAILED: {lines[-1]}")
                    continue
                results[method.key].append(json.loads(out.read_text()))
                log(f"round {r + 1}/{rounds}  {method.label:<22} {time.perf_counter() - start:6.1f} s")
    return results


# --- summary ------------------------------------------------------------------------------------
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio_spread(per_round: list[list[float]]) -> dict[str, Any] | None:
    """Median and spread of a ratio from its samples, one list per round (see the module docstring).

    ``median``: of the per-round medians; ``low`` / ``high``: the lowest and highest per-round
    median, or with a single round the lowest and highest sample (``spread_over`` says which).
    """
    rounds = [statistics.median(values) for values in per_round if values]
    if not rounds:
        return None
    samples = rounds if len(rounds) > 1 else [v for values in per_round for v in values]
    return {
        "median": statistics.median(rounds),
        "low": min(samples),
        "high": max(samples),
        "per_round": rounds,
        "spread_over": "rounds" if len(rounds) > 1 else "repeats",
    }


def _pairs(run: dict[str, Any], key: str, reference: str) -> list[float]:
    """``key / reference`` for each measurement and the adapter-off one timed next to it."""
    return [t / r for t, r in zip(run[key], run[reference])]


def _relative(samples: list[float], reference: list[float]) -> list[float]:
    """Samples of one round divided by the median of the reference's samples in that round."""
    middle = _median(reference)
    return [s / middle for s in samples] if middle else []


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians per method: times pooled over every repeat of every round (memory: over rounds), and
    every ratio with its spread (:func:`ratio_spread`).

    Ratios to the floor pair each step with the floor step timed next to it in the same worker, a
    forward with the base forward; ratios to LoRA divide a round's figure by LoRA's of that round.
    """
    keys = ("step_s", "floor_step_s", "forward_base_s", "forward_unmerged_s", "forward_merged_s", "merge_s")
    lora = runs.get("lora")
    summary = {}
    for key, per_round in runs.items():
        pooled = {k: [v for run in per_round for v in run[k]] for k in keys}
        step_floor = [_pairs(run, "step_s", "floor_step_s") for run in per_round]
        memory = [[run["peak_memory_bytes"] / 1e9] for run in per_round]
        vs_lora: dict[str, Any] = {"step_vs_lora": None, "memory_vs_lora": None}
        if lora:
            pairs = list(zip(per_round, lora))
            vs_lora["step_vs_lora"] = ratio_spread(
                [
                    _relative(s, _pairs(ref, "step_s", "floor_step_s"))
                    for s, (_, ref) in zip(step_floor, pairs)
                ]
            )
            vs_lora["memory_vs_lora"] = ratio_spread(
                [[run["peak_memory_bytes"] / ref["peak_memory_bytes"]] for run, ref in pairs]
            )
        summary[key] = {
            "label": METHODS[key].label,
            "trainable_params": per_round[0]["trainable_params"],
            "latent_size": per_round[0].get("latent_size"),
            "step_s": _median(pooled["step_s"]),
            "floor_step_s": _median(pooled["floor_step_s"]),
            "step_vs_floor": ratio_spread(step_floor),
            "step_vs_lora": vs_lora["step_vs_lora"],
            "peak_memory_gb": _median([m for (m,) in memory]),
            "memory_vs_lora": vs_lora["memory_vs_lora"],
            "forward_base_s": _median(pooled["forward_base_s"]),
            "forward_unmerged_s": _median(pooled["forward_unmerged_s"]),
            "forward_merged_s": _median(pooled["forward_merged_s"]),
            "unmerged_vs_base": ratio_spread(
                [_pairs(run, "forward_unmerged_s", "forward_base_s") for run in per_round]
            ),
            "merged_vs_base": ratio_spread(
                [_pairs(run, "forward_merged_s", "forward_base_s") for run in per_round]
            ),
            "merge_s": _median(pooled["merge_s"]),
            "rounds": len(per_round),
            "samples": {k: len(v) for k, v in pooled.items()},
        }
    return summary


DEFAULT_BAR = 1.05
"""Default ``--bar``: the step × LoRA that the "≤ bar" column tests the whole spread against."""


def verdict(ratio: dict[str, Any] | None, bar: float) -> str:
    """``yes`` when the whole spread is at or under ``bar``, ``no`` when all above, else ``unclear``."""
    if ratio is None:
        return "—"
    if ratio["high"] <= bar:
        return "yes"
    if ratio["low"] > bar:
        return "no"
    return "unclear"


def table_note(bar: float = DEFAULT_BAR) -> str:
    return (
        "Ratios: median over rounds (lowest–highest round; with one round, lowest–highest paired "
        "repeat). × floor pairs each step with a floor step timed next to it in the same worker (the "
        "floor: adapter off, zero-cost taps on the adapted layers, so the backward still reaches "
        "them); × LoRA divides by LoRA's figure of the same round; × base pairs each forward with an "
        f"adapter-off forward. ≤ {bar:g}: step × LoRA under {bar:g} for the whole spread (yes), above "
        "it for the whole spread (no), or straddling it (unclear). Memory: peak of the training phase."
    )


TABLE_NOTE = table_note()


def format_table(summary: dict[str, dict[str, Any]], bar: float = DEFAULT_BAR) -> str:
    """Markdown table: absolute figures and ratios (median and spread) against LoRA, the floor and the
    base forward (see :func:`table_note`)."""

    def cell(value: float | None, fmt: str = ".2f") -> str:
        return "—" if value is None else format(value, fmt)

    def spread(ratio: dict[str, Any] | None) -> str:
        if ratio is None:
            return "—"
        return f"{ratio['median']:.2f} ({ratio['low']:.2f}–{ratio['high']:.2f})"

    head = ("| method | trainable params | s/step | × LoRA | ≤ " + f"{bar:g}" + " | × floor | peak mem (GB) "
            "| × LoRA | unmerged fwd (s) | × base | merged fwd (s) | × base | merge (s) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for s in summary.values():
        lines.append("| " + " | ".join([
            s["label"], f"{s['trainable_params']:,}",
            cell(s["step_s"]), spread(s.get("step_vs_lora")), verdict(s.get("step_vs_lora"), bar),
            spread(s["step_vs_floor"]),
            cell(s["peak_memory_gb"]), spread(s.get("memory_vs_lora")),
            cell(s["forward_unmerged_s"]), spread(s["unmerged_vs_base"]),
            cell(s["forward_merged_s"]), spread(s["merged_vs_base"]),
            cell(s["merge_s"]),
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


# --- per-layer profile --------------------------------------------------------------------------
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

    from . import functional, layers

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


# --- command line -------------------------------------------------------------------------------
def unavailable_methods(methods: list[Method]) -> dict[str, str]:
    """``{key: reason}`` of the methods that cannot run here."""
    return {m.key: reason for m in methods if (reason := m.unavailable_reason()) is not None}


def benchmark_report(
    preset: Preset, methods: list[Method], device: str, rounds: int, bar: float = DEFAULT_BAR,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Run the available ``methods`` and return the JSON report (the unavailable ones with their reason)."""
    unavailable = unavailable_methods(methods)
    start = time.perf_counter()
    failed: dict[str, str] = {}
    runs = run_benchmark(
        preset, [m for m in methods if m.key not in unavailable], device, rounds, log, failed
    )
    return {
        "preset": dataclasses.asdict(preset),
        "latent_size": preset.latent_size,
        "device": device,
        "threads": available_cores(),
        "rounds": rounds,
        "bar": bar,
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "elapsed_s": time.perf_counter() - start,
        "unavailable": unavailable,
        "failed": failed,
        "summary": summarize(runs),
        "runs": runs,
    }


def format_report(report: dict[str, Any]) -> str:
    """The table, its note and the methods not measured (with why)."""
    text = format_table(report["summary"], report["bar"]) + "\n\n" + table_note(report["bar"])
    for key, reason in report["unavailable"].items():
        text += f"\nnot measured: {key} ({METHODS[key].label}): {reason}"
    for key, error in report.get("failed", {}).items():
        text += f"\nfailed: {key} ({METHODS[key].label}): {error}"
    return text


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="benchmark worker: one method, one process")
    parser.add_argument("--worker", required=True, choices=list(METHODS))
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--latent-size", type=int, default=None)
    parser.add_argument("--timed-steps", type=int, default=None)
    parser.add_argument("--forward-repeats", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker-out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(available_cores())
    preset = with_overrides(PRESETS[args.preset], args.latent_size, args.timed_steps, args.forward_repeats)
    result = measure(METHODS[args.worker], preset, args.device)
    atomic_write_text(args.worker_out, json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The worker process (``--worker METHOD ...``: one method, one process); the benchmark's command line
    is ``boft-diffusion bench`` (:mod:`boft_diffusion.commands.bench`)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" not in argv:
        print("this module runs benchmark workers; run the benchmark with `boft-diffusion bench`", file=sys.stderr)
        return 2
    return _worker(argv)


if __name__ == "__main__":
    sys.exit(main())
