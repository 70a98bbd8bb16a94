"""The DDPM epsilon-prediction loss, kept per sample so hooks can weigh or skip samples."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def per_sample_diffusion_loss(
    model: torch.nn.Module, noise_scheduler: DDPMScheduler, clean: torch.Tensor, **model_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per sample, timesteps): mean over C, H, W of (eps - eps_theta(x_t, t))^2."""
    noise = torch.randn(clean.shape, device="cpu").to(clean.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],)).to(clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    prediction = model(noisy, timesteps, **model_kwargs).sample
    losses = (prediction.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
    return losses, timesteps


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the per-sample losses; 0 (with a graph) when every weight is 0."""
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)
