"""The denoising objective: latents, noise, timesteps, prediction targets and (Min-SNR) loss.

With ``x0`` the VAE latents, ``eps ~ N(0, I)`` and ``t ~ U{0..T-1}``, the scheduler gives
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; the model predicts ``eps`` (epsilon), or
``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (v_prediction). ``SNR(t) = abar_t / (1 - abar_t)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "diffusion_loss",
    "encode_latents",
    "prediction_target",
    "sample_noise",
    "sample_timesteps",
    "snr",
    "snr_loss_weights",
]


def encode_latents(vae: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in ``[-1, 1]`` -> scaled latents ``(B, C, H/f, W/f)`` (a posterior sample)."""
    latents = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


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
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in float32; with ``weights`` ``(B,)`` each sample's mean is weighted."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    return (per_sample * weights.float()).mean()
