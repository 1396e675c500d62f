"""Bare denoisers of a preset's shape with cheap random weights, their inputs and the layers every method adapts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..inject import UNET_ATTENTION_TARGETS
from .presets import Preset


def _random_pool(seed: int) -> torch.Tensor:
    """``2**20`` uniform values in [-1, 1): what :func:`_cheap_init` slices weights from."""
    return torch.rand(1 << 20, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def _cheap_init(model: nn.Module, seed: int, recurse: bool = True, pool: torch.Tensor | None = None) -> None:
    """Finite, well-scaled values at memory speed: slices of one random pool, scaled by ``1/sqrt(fan_in)``.

    Timing does not depend on the values, only on them being finite and of sane magnitude (no
    overflow, no denormals); drawing 860M fresh random numbers would take longer than a step.
    ``recurse=False``: only ``model``'s own parameters; ``pool``: one made once for many calls (else
    :func:`_random_pool` of ``seed``).
    """
    pool = _random_pool(seed) if pool is None else pool
    for i, (name, p) in enumerate(model.named_parameters(recurse=recurse)):
        if p.ndim == 1:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        bound = math.sqrt(3.0 / p[0].numel())
        flat = p.view(-1)
        offset = (i * 7919 + seed) % pool.numel()
        for start in range(0, flat.numel(), pool.numel()):  # the first chunk from the pool rolled by offset
            chunk = flat[start : start + pool.numel()]
            head = pool[offset if start == 0 else 0 :][: chunk.numel()]
            chunk[: head.numel()].copy_(head)
            chunk[head.numel() :].copy_(pool[: chunk.numel() - head.numel()])
            chunk.mul_(bound)  # in place: no temporary of the layer's size


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


def build_model(
    preset: Preset,
    device: torch.device,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    quantize: Callable[[nn.Linear], nn.Module] | None = None,
) -> nn.Module:
    """The preset's model, built on the meta device and filled by :func:`_cheap_init`, frozen.

    Only one copy of the weights is ever allocated (none on ``device="meta"``, to check shapes). With
    ``dtype`` (the frozen weights' dtype, as the recipes cast them) or ``quantize`` (a frozen Linear to its
    quantized replacement) the model is filled one layer at a time, each layer cast and quantized before the
    next is allocated, so the process never holds more than one layer in float32 (a quantized base's peak
    is its own, as when diffusers loads one).
    """
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, MODEL_SHAPES[preset.shape].model_class)(**preset.model)
    if device.type == "meta":
        return model.requires_grad_(False)
    if next(model.buffers(), None) is not None:  # buffers would need their real values
        raise RuntimeError(f"{type(model).__name__} with buffers: meta-device construction does not apply")
    if dtype is None and quantize is None:
        model.to_empty(device=device)
        _cheap_init(model, seed)
        return model.requires_grad_(False)
    pool = _random_pool(
        seed
    )  # one pool: a fresh one per layer would fragment the heap between quantized layers
    for i, parent in enumerate(list(model.modules())):
        if any(p.is_meta for p in parent.parameters(recurse=False)):
            _fill(parent, device, i, pool, dtype)
        for j, (name, child) in enumerate(list(parent.named_children())):
            if quantize is not None and type(child) is nn.Linear:  # the layers diffusers' loaders quantize
                _fill(child, device, i + j, pool, dtype)
                setattr(parent, name, quantize(child.requires_grad_(False)))
    return model.requires_grad_(False)


def _fill(
    module: nn.Module, device: torch.device, seed: int, pool: torch.Tensor, dtype: torch.dtype | None
) -> None:
    """Allocate ``module``'s own parameters on ``device``, fill them cheaply, cast them to ``dtype``."""
    module.to_empty(device=device, recurse=False)
    _cheap_init(module, seed, recurse=False, pool=pool)
    if dtype is not None:
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)


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
