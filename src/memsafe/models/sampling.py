"""Sampling from a trained denoiser with DDIM (eta = 0), as the memorization literature does."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm


@torch.no_grad()
def generate(
    unet: UNet2DModel,
    noise_scheduler: DDPMScheduler,
    num_images: int,
    steps: int = 50,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """`num_images` samples in model range [-1, 1]; the same seed gives the same images."""
    scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    scheduler.set_timesteps(steps)
    unet = unet.to(device).eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    bar = tqdm(total=num_images * steps, desc="sampling", unit="step", disable=not progress, leave=False)
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        images = torch.randn((count, *shape), generator=generator).to(device)
        for t in scheduler.timesteps:
            noise_pred = unet(images, t).sample
            images = scheduler.step(noise_pred, t, images, eta=0.0).prev_sample
            bar.update(count)
        batches.append(images.clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(batches)
