"""The denoising objective: latents, noise, timesteps, prediction targets and (Min-SNR) loss.

DDPM families (SD, SDXL): with ``x0`` the VAE latents, ``eps ~ N(0, I)`` and ``t ~ U{0..T-1}``, the
scheduler gives ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; the model predicts ``eps`` (epsilon), or
``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (v_prediction). ``SNR(t) = abar_t / (1 - abar_t)``.

Flow-matching families (SD3, Flux): ``x_s = (1 - s) x0 + s eps`` at the schedule's sigma ``s`` of a
timestep drawn by a density (uniform, logit-normal, mode, cosmap: diffusers' ``training_utils``); the model
predicts the velocity ``eps - x0``, and the loss may be weighted by sigma (``compute_loss_weighting_for_sd3``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "Noised",
    "diffusion_loss",
    "noise_latents",
    "training_scheduler",
    "prediction_target",
    "sample_noise",
    "sample_timesteps",
    "snr",
    "snr_loss_weights",
]


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0) -> torch.Tensor:
    """``eps ~ N(0, I)`` like ``latents``; ``noise_offset > 0`` adds a per-channel constant ``offset * N(0, 1)``."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype
        )
    return noise


def sample_timesteps(scheduler: Any, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """Uniform training timesteps ``(B,)`` in ``[0, num_train_timesteps)``."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device).long()


def prediction_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model should predict under the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"Unknown prediction_type {kind!r} (epsilon, v_prediction or sample)")


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """``SNR(t) = abar_t / (1 - abar_t)`` for each timestep, ``(B,)`` float32."""
    abar = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return abar / (1.0 - abar)


def snr_loss_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): ``min(SNR, gamma) / SNR`` for epsilon,
    ``min(SNR, gamma) / (SNR + 1)`` for v_prediction, ``min(SNR, gamma)`` for sample; ``(B,)``."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / ratio
    if kind == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    spatial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error in float32; with ``weights`` ``(B,)`` each sample's mean is weighted; with
    ``spatial`` ``(B, 1, h, w)`` (a loss mask at the latents' size) each element's error is weighted first,
    the mean still over every element (kohya's masked loss)."""
    if weights is None and spatial is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if spatial is not None:
        error = error * spatial.float()
    per_sample = error.flatten(1).mean(dim=1)
    return per_sample.mean() if weights is None else (per_sample * weights.float()).mean()


@dataclass
class Noised:
    """One batch's training inputs: the noised latents, their timesteps, what the model should predict,
    and per-sample loss weights (``None``: plain mean)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None


def training_scheduler(objective: str, scheduler: Any) -> Any:
    """The noise scheduler training draws from: DDPM for ``ddpm`` families, flow-matching Euler for ``flow``
    ones (each from the pipeline scheduler's config, so shifts and prediction types carry over)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    kind = FlowMatchEulerDiscreteScheduler if objective == "flow" else DDPMScheduler
    return kind.from_config(scheduler.config)


def noise_latents(objective: str, scheduler: Any, latents: torch.Tensor, train: Any) -> Noised:
    """Noise ``latents`` for one training step as the family's objective does (``train``: ``noise_offset``,
    ``snr_gamma`` for DDPM; ``weighting_scheme``, ``logit_mean``, ``logit_std``, ``mode_scale`` for flow)."""
    noise = sample_noise(latents, train.noise_offset)
    if objective != "flow":
        timesteps = sample_timesteps(scheduler, latents.shape[0], latents.device)
        weights = snr_loss_weights(scheduler, timesteps, train.snr_gamma) if train.snr_gamma else None
        return Noised(
            scheduler.add_noise(latents, noise, timesteps), timesteps,
            prediction_target(scheduler, latents, noise, timesteps), weights,
        )  # fmt: skip
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    u = compute_density_for_timestep_sampling(
        train.weighting_scheme, latents.shape[0], train.logit_mean, train.logit_std, train.mode_scale
    )
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(device=latents.device, dtype=latents.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    weights = None
    if train.weighting_scheme in ("sigma_sqrt", "cosmap"):
        weights = compute_loss_weighting_for_sd3(train.weighting_scheme, sigmas).flatten()
    return Noised(noisy, timesteps, noise - latents, weights)
