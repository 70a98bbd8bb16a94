"""AGC calibrated on held-out images: the loss bank fed by the denoising losses of images the model never trains on
(`defense.iet_agc.calibration_source`), at the training batch's timesteps, instead of the training draws' own.

Why: the reference rule's bank is the mean loss of whatever is drawn. When a few images are duplicated many
times, their copies are a large share of the draws, and as they are learned they pull that mean down with
them, so the skipping threshold follows the memorized images down (docs/research/iet-agc.md, 2026-12-05). A
held-out image's loss is what a membership-inference attack compares a training image's loss with; a bank of
held-out losses cannot be pulled down by memorization."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from memsafe.data.image_folder import load_image_folder
from memsafe.errors import MemsafeError
from memsafe.train.loop import model_inputs
from memsafe.train.loss import per_sample_diffusion_loss

if TYPE_CHECKING:  # pragma: no cover
    from memsafe.config import RunConfig
    from memsafe.train.loop import Trainer


class CalibrationLosses:
    """Draws `batch_size` calibration images per training batch and returns their losses under the model being
    trained, no gradient. Their captions are dropped at the training rate, so that the bank estimates a
    non-member's loss under the same conditioning the training draws get."""

    def __init__(self, config: RunConfig, trainer: Trainer):
        iet, data = config.defense.iet_agc, config.data
        images = load_image_folder(iet.calibration_source, data.resolution, data.channels, data.center_crop, lazy=True)
        self.inputs = model_inputs(config, images)
        self.batch_size = iet.calibration_batch
        self.conditioner = None
        if trainer.conditioner is not None:
            from memsafe.models.text import CaptionConditioner

            if images.captions is None:
                raise MemsafeError(f"defense.iet_agc.calibration_source {iet.calibration_source} has no captions "
                                   "(metadata.jsonl 'text' fields), and the model is text-conditional")
            self.conditioner = CaptionConditioner(trainer.conditioner.encoder, images.captions,
                                                  config.train.caption_dropout)

    @torch.no_grad()
    def losses(self, batch: dict, trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses, timesteps) of calibration images at the first timesteps of `batch`. Draws from the batch's
        own generator, so a resumed run draws the same."""
        generator = batch["generator"]
        timesteps = batch["timesteps"].cpu()
        timesteps = timesteps[torch.arange(self.batch_size) % len(timesteps)]
        chosen = torch.randint(len(self.inputs), (self.batch_size,), generator=generator)
        noise = torch.randn((self.batch_size, *self.inputs.shape[1:]), generator=generator)
        kwargs = {}
        if self.conditioner is not None:
            kwargs = self.conditioner.model_kwargs(chosen, trainer.device, torch.rand(self.batch_size, generator=generator))
        with trainer.accelerator.autocast():
            losses, _ = per_sample_diffusion_loss(
                trainer.unet, trainer.noise_scheduler, self.inputs[chosen].to(trainer.device), noise, timesteps,
                snr_gamma=trainer.config.train.snr_gamma, **kwargs,
            )
        return losses.float().cpu(), timesteps
