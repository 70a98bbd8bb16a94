"""Denoising loss on held-out images: how well a model predicts images it never trained on (a text-conditional
model from their captions). Noise and timesteps are drawn from a fixed seed, so two models are scored
on exactly the same draws and their difference carries no sampling noise, unlike scores of generations."""

from __future__ import annotations

import torch

from memsafe.train.loss import draw_noise, per_sample_diffusion_loss


@torch.no_grad()
def heldout_denoising_loss(unet: torch.nn.Module, noise_scheduler, encoder, images: torch.Tensor,
                           captions: list[str] | None, draws: int = 8, seed: int = 0,
                           batch_size: int = 256) -> torch.Tensor:
    """(len(images),) mean denoising loss of each image (under its caption when `encoder` is given; None for
    an unconditional model), over `draws` (noise, timestep) pairs that depend on `seed` only."""
    if not len(images):
        raise ValueError("need at least one image")
    if encoder is not None and (captions is None or len(images) != len(captions)):
        raise ValueError(f"need as many captions as images: got {len(images)} and {len(captions or [])}")
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
                condition = {} if encoder is None else {
                    "encoder_hidden_states": encoder.encode_unique(captions[chosen]).to(device)}
                losses, _ = per_sample_diffusion_loss(unet, noise_scheduler, images[chosen].to(device),
                                                      noise[chosen], steps[chosen], **condition)
                total[chosen] += losses.cpu()
    finally:
        unet.train(was_training)
    return total / draws
