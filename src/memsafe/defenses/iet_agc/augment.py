"""AGC+ augmentation: a sample's augmentation strength rises as its loss falls towards the skipping threshold."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memsafe.defenses.iet_agc.agc import SampleLedger
from memsafe.defenses.iet_agc.config import IETConfig
from memsafe.train.hooks import TrainHook


def augmentation_strength(relative_loss: torch.Tensor, ratio: float) -> torch.Tensor:
    """0 when a sample's loss is at or above the bank's running mean (relative loss >= 1), rising linearly
    to 1 at the skipping threshold (relative loss 1 / lambda) and staying 1 below it. Never-seen samples
    (relative loss inf) get 0. Monotone: a lower loss never gets weaker augmentation."""
    threshold = 1.0 / ratio
    span = max(1.0 - threshold, 1e-6)
    strength = (1.0 - relative_loss.double()) / span
    return strength.clamp(0.0, 1.0).nan_to_num(0.0).float()


def augment_latents(
    latents: torch.Tensor, strength: torch.Tensor, config: IETConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The augmentation on VAE latents, restricted to what nearly commutes with the VAE: translation by whole
    latent cells (one cell = the VAE's factor in pixels; the edge cells repeat). Shifts under half a cell
    round to none. Flips (a flipped latent is not the latent of the flipped image: bench/latent_shift.py),
    brightness and contrast have no latent counterpart and are not applied (`validate` refuses flips)."""
    active = (strength > 0).nonzero().flatten().tolist()
    if not active:
        return latents
    out = latents.clone()
    side = latents.shape[-1]
    draws = torch.rand(len(latents), 2, generator=generator)
    for i in active:
        dx, dy = ((draws[i] * 2 - 1) * strength[i].item() * config.augment_max_shift * side).round().int().tolist()
        x = latents[i : i + 1]
        if dx or dy:
            pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
            x = F.pad(x, pad, mode="replicate")[..., pad[3] : pad[3] + side, pad[1] : pad[1] + side]
        out[i] = x[0]
    return out


def augment_batch(
    pixels: torch.Tensor, strength: torch.Tensor, config: IETConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample translation, brightness/contrast jitter and (optionally) flips, scaled by `strength`.
    Samples with strength 0 pass through unchanged. Draws from `generator` (else torch's global RNG)."""
    active = strength > 0
    if not active.any():
        return pixels
    x = pixels[active]
    s = strength[active].to(x).view(-1, 1, 1, 1)
    n = x.shape[0]
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1).to(x) * s.view(-1, 1) * config.augment_max_shift * 2  # grid spans [-1, 1]
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    if config.augment_flip:
        flip = torch.rand(n, generator=generator).to(x.device) < 0.5 * s.view(-1)
        theta[flip, 0, 0] = -1.0
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Shift in [0, 2] so that regions moved in from outside read as the background (-1), not grey.
    x = F.grid_sample(x + 1, grid, padding_mode="zeros", align_corners=False) - 1
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1).to(x) * s * config.augment_max_jitter
    brightness = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1).to(x) * s * config.augment_max_jitter
    out = pixels.clone()
    out[active] = (x * contrast + brightness).clamp(-1, 1)
    return out


class LossDrivenAugmentation(TrainHook):
    name = "augment"

    def __init__(self, ledger: SampleLedger, ratio: float, config: IETConfig):
        self.ledger, self.ratio, self.config = ledger, ratio, config
        self.strength_sum = 0.0
        self.count = 0

    def on_batch_start(self, batch, trainer):
        strength = augmentation_strength(self.ledger.smoothed[batch["index"].cpu()], self.ratio)
        self.strength_sum += float(strength.sum())
        self.count += len(strength)
        augment = augment_latents if getattr(trainer, "latent", False) else augment_batch
        batch["pixels"] = augment(batch["pixels"], strength.to(batch["pixels"].device), self.config, batch.get("generator"))
        return batch

    def log_values(self):
        mean = self.strength_sum / self.count if self.count else 0.0
        self.strength_sum, self.count = 0.0, 0
        return {"augment_strength": mean}
