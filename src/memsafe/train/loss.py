"""The denoising loss (epsilon or v prediction, as the noise scheduler's config says), kept per sample so
hooks can weigh or skip samples; optionally min-SNR-gamma weighted as in diffusers' training scripts."""

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
    snr_gamma: float | None = None,
    **model_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per sample, timesteps): mean over C, H, W of (target - prediction)^2, the target being the noise
    or, under v_prediction, the velocity. Noise and timesteps not given are drawn from torch's global RNG."""
    if noise is None or timesteps is None:
        noise, timesteps = draw_noise(noise_scheduler, tuple(clean.shape))
    noise, timesteps = noise.to(clean.device), timesteps.to(clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    prediction = model(noisy, timesteps, **model_kwargs).sample
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
    losses = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if snr_gamma is not None:
        losses = losses * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return losses, timesteps


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample (divided by SNR + 1 under v_prediction), arXiv 2303.09556."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the per-sample losses; 0 (with a graph) when every weight is 0."""
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)
