"""Networks and sampling."""

from memsafe.models.sampling import generate
from memsafe.models.unet import build_noise_scheduler, build_unet, load_pretrained_unet

__all__ = ["build_noise_scheduler", "build_unet", "generate", "load_pretrained_unet"]
