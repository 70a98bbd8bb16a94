"""The DDPM epsilon-prediction loss, kept per sample so hooks can weigh or skip samples."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def draw_noise(
    noise_scheduler: DDPMScheduler, shape: tuple[int, ...], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) for a batch of `shape`, drawn on the CPU so every device gets the same values."""
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (shape[0],), generator=generator)
    return noise, timesteps


def per_sample_diffusion_loss(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    **model_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per sample, timesteps): mean over C, H, W of (eps - eps_theta(x_t, t))^2. Noise and timesteps
    not given are drawn from torch's global RNG."""
    if noise is None or timesteps is None:
        noise, timesteps = draw_noise(noise_scheduler, tuple(clean.shape))
    noise, timesteps = noise.to(clean.device), timesteps.to(clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    prediction = model(noisy, timesteps, **model_kwargs).sample
    losses = (prediction.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
    return losses, timesteps


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the per-sample losses; 0 (with a graph) when every weight is 0."""
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)
