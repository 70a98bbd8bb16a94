"""Denoising loss on held-out captioned images: how well a text-conditional model predicts images it never
trained on from their captions. Noise and timesteps are drawn from a fixed seed, so two models are scored
on exactly the same draws and their difference carries no sampling noise, unlike scores of generations."""

from __future__ import annotations

import torch

from memsafe.train.loss import draw_noise, per_sample_diffusion_loss


@torch.no_grad()
def heldout_denoising_loss(unet: torch.nn.Module, noise_scheduler, encoder, images: torch.Tensor,
                           captions: list[str], draws: int = 8, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """(len(images),) mean epsilon-prediction loss of each image under its caption, over `draws` (noise,
    timestep) pairs that depend on `seed` only."""
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"need as many captions as images, and at least one: got {len(images)} and {len(captions)}")
    generator = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    total = torch.zeros(len(images))
    try:
        for _ in range(draws):
            noise, steps = draw_noise(noise_scheduler, tuple(images.shape), generator)
            for start in range(0, len(images), batch_size):
                chosen = slice(start, start + batch_size)
                hidden = encoder.encode_unique(captions[chosen]).to(device)
                losses, _ = per_sample_diffusion_loss(unet, noise_scheduler, images[chosen].to(device),
                                                      noise[chosen], steps[chosen], encoder_hidden_states=hidden)
                total[chosen] += losses.cpu()
    finally:
        unet.train(was_training)
    return total / draws
