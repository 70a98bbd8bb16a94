"""Stable Diffusion pipeline folders as the model: checks on the folder (JSON only, before anything is
written), and the VAE that moves images to latents and back.

A folder counts as a latent pipeline when its `model_index.json` names a `vae`. Its UNet is trained in the
VAE's latent space, with the pipeline's own CLIP tokenizer and frozen text encoder (models/text.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memsafe.errors import MemsafeError

SUPPORTED = {"StableDiffusionPipeline"}
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
VAE_CLASSES = {"AutoencoderKL", "AutoencoderTiny"}


def pipeline_index(path: str | Path | None) -> dict | None:
    """The folder's model_index.json when it describes a latent pipeline (it names a vae), else None."""
    if not path:
        return None
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        values = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise MemsafeError(f"model.pretrained {index} is not valid JSON: {exc}") from exc
    return values if "vae" in values or "text_encoder_2" in values else None


def is_latent_pipeline(model) -> bool:
    """Whether `model.pretrained` (a ModelConfig) is a latent pipeline folder."""
    return pipeline_index(model.pretrained) is not None


def _component_config(folder: Path, name: str) -> dict:
    path = folder / name / ("tokenizer_config.json" if name == "tokenizer" else
                            "scheduler_config.json" if name == "scheduler" else "config.json")
    if not path.is_file():
        raise MemsafeError(f"model.pretrained pipeline {folder} is missing {name}/ ({path.name} not found)")
    return json.loads(path.read_text())


def check_pipeline(folder: str | Path, resolution: int) -> dict:
    """Refuses, in one line naming the culprit, a pipeline memsafe cannot train; returns facts about it:
    latent channels and size factor, text length, tokenizer length."""
    folder = Path(folder)
    index = pipeline_index(folder) or {}
    kind = index.get("_class_name", "?")
    if "text_encoder_2" in index or "XL" in kind:
        raise MemsafeError(f"model.pretrained {folder} is a {kind} (SDXL: two text encoders and added time ids); "
                           "memsafe trains Stable Diffusion 1.x / 2.x pipelines only")
    if kind not in SUPPORTED:
        raise MemsafeError(f"model.pretrained {folder} is a {kind}; memsafe trains {', '.join(sorted(SUPPORTED))}")
    configs = {name: _component_config(folder, name) for name in REQUIRED}
    vae_class = (index.get("vae") or [None, None])[1]
    if vae_class not in VAE_CLASSES:
        raise MemsafeError(f"model.pretrained {folder}: vae is {vae_class}, expected one of {', '.join(sorted(VAE_CLASSES))}")
    vae, unet = configs["vae"], configs["unet"]
    channels = vae.get("latent_channels", 4)
    if unet.get("in_channels") != channels:
        raise MemsafeError(f"model.pretrained {folder}: the VAE gives {channels}-channel latents but the UNet takes "
                           f"{unet.get('in_channels')} channels")
    blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels")
    factor = 2 ** (len(blocks) - 1)
    unet_factor = 2 ** (len(unet.get("block_out_channels", [0])) - 1)
    if resolution % (factor * unet_factor):
        raise MemsafeError(f"data.resolution {resolution} cannot go through {folder}: its VAE divides by {factor} and "
                           f"its UNet by {unet_factor}, so the resolution must be a multiple of {factor * unet_factor}")
    return {"latent_channels": channels, "factor": factor, "vae_class": vae_class,
            "max_text_length": int(configs["tokenizer"].get("model_max_length", 77))}


class LatentCodec:
    """The pipeline's frozen VAE: images in [-1, 1] to scaled latents and back, as diffusers' pipelines and
    training scripts do ((mean - shift) * scaling_factor; decoding inverts it)."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        import diffusers

        facts = check_pipeline(folder, 0)
        self.vae = getattr(diffusers, facts["vae_class"]).from_pretrained(Path(folder), subfolder="vae",
                                                                          local_files_only=True)
        self.vae.requires_grad_(False).eval().to(device)
        self.factor = facts["factor"]
        self.channels = facts["latent_channels"]
        self.scaling = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.device = device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(images.to(self.device, self.vae.dtype))
        latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
        return ((latents.float() - self.shift) * self.scaling).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        images = [self.vae.decode((chunk.to(self.device, self.vae.dtype) / self.scaling) + self.shift).sample
                  for chunk in latents.split(batch_size)]
        return torch.cat(images).float().clamp(-1, 1).cpu()


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def save_latent_model(unet: torch.nn.Module, pretrained: str | Path, folder: Path, merged: bool) -> None:
    """Into `folder` (which must not exist): under LoRA, `pytorch_lora_weights.safetensors` in diffusers'
    format (what `pipe.load_lora_weights(folder)` reads) and, when `merged`, the merged pipeline beside it
    in `merged/`; under full fine-tuning, a complete pipeline folder with the trained UNet."""
    import shutil

    from memsafe.models.lora import has_lora, merged_copy

    pretrained = Path(pretrained)
    if has_lora(unet):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        config = unet.peft_config["default"]
        metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
        if not merged:
            return
        unet, folder = merged_copy(unet), folder / "merged"
    shutil.copytree(pretrained, folder, ignore=lambda where, names: ["unet"] if Path(where) == pretrained else [],
                    dirs_exist_ok=True)
    unet.save_pretrained(folder / "unet")


def load_latent_unet(model_folder: Path, pretrained: str | Path) -> torch.nn.Module:
    """The trained UNet of a pipeline run's `model/`: its own unet/, or the base UNet with the LoRA weights
    loaded and fused by diffusers."""
    from diffusers import UNet2DConditionModel

    if (model_folder / "unet").is_dir():
        return UNet2DConditionModel.from_pretrained(model_folder / "unet", local_files_only=True).eval()
    unet = UNet2DConditionModel.from_pretrained(Path(pretrained), subfolder="unet", local_files_only=True)
    unet.load_lora_adapter(model_folder, weight_name=LORA_WEIGHTS, prefix="unet", adapter_name="trained")
    unet.fuse_lora()
    unet.unload_lora()
    return unet.eval()
