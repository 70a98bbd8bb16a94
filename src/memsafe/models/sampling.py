"""Sampling from a trained denoiser with DDIM (eta = 0), as the memorization literature does."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from memsafe.progress import progress_bar


def _predict_noise(unet, images, t, cond, uncond, guidance_scale):
    if cond is None:
        return unet(images, t).sample
    if uncond is None or guidance_scale == 1.0:
        return unet(images, t, encoder_hidden_states=cond).sample
    both = unet(torch.cat([images, images]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def generate(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    num_images: int,
    steps: int = 50,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    encoder_hidden_states: torch.Tensor | None = None,
    uncond_hidden_states: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    size: int | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """`num_images` samples in model range [-1, 1]; the same seed gives the same images.

    For a text-conditional UNet pass one row of `encoder_hidden_states` per image, and the empty
    prompt's embedding (1, L, d) as `uncond_hidden_states` for classifier-free guidance. `size`: the side of
    what is sampled (latents of a pipeline run), when it differs from the UNet's `sample_size`; latents are
    returned unclamped (`clamp=False`)."""
    scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    scheduler.set_timesteps(steps)
    unet = unet.to(device).eval()
    side = size or unet.config.sample_size
    shape = (unet.config.in_channels, side, side)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    bar = progress_bar(total=num_images * steps, desc="sampling", unit="step", disable=not progress, leave=False)
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        images = torch.randn((count, *shape), generator=generator).to(device)
        cond = None if encoder_hidden_states is None else encoder_hidden_states[start : start + count].to(device)
        uncond = None if uncond_hidden_states is None else uncond_hidden_states.expand(count, -1, -1).to(device)
        for t in scheduler.timesteps:
            noise_pred = _predict_noise(unet, images, t, cond, uncond, guidance_scale)
            images = scheduler.step(noise_pred, t, images, eta=0.0).prev_sample
            bar.update(count)
        batches.append((images.clamp(-1, 1) if clamp else images).cpu())
    bar.close()
    return torch.cat(batches)
