"""Denoising networks: a diffusers UNet built from the run config, or loaded from a local directory."""

from __future__ import annotations

from pathlib import Path

from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from memsafe.config import DataConfig, ModelConfig
from memsafe.errors import MemsafeError


def unet_class(model: ModelConfig) -> type:
    return UNet2DConditionModel if model.conditioning == "text" else UNet2DModel


def build_unet(model: ModelConfig, data: DataConfig, cross_attention_dim: int | None = None):
    """A UNet2DModel, or with `model.conditioning: text` a UNet2DConditionModel reading `cross_attention_dim`-d
    text embeddings at the levels where `attention_levels` is true."""
    if model.pretrained:
        return load_pretrained_unet(model.pretrained, data, model, cross_attention_dim)
    conditional = model.conditioning == "text"
    attention = "CrossAttn" if conditional else "Attn"
    down = [f"{attention}DownBlock2D" if a else "DownBlock2D" for a in model.attention_levels]
    up = [f"{attention}UpBlock2D" if a else "UpBlock2D" for a in reversed(model.attention_levels)]
    common = dict(
        sample_size=data.resolution,
        in_channels=data.channels,
        out_channels=data.channels,
        block_out_channels=tuple(model.block_out_channels),
        layers_per_block=model.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=model.norm_num_groups,
        attention_head_dim=8,
    )
    if conditional:
        return UNet2DConditionModel(**common, cross_attention_dim=cross_attention_dim)
    return UNet2DModel(**common)


def _unet_folder(path: Path) -> Path:
    """A pipeline directory keeps its UNet under unet/; a bare UNet directory is used as it is."""
    return path / "unet" if (path / "model_index.json").exists() or (path / "unet").is_dir() else path


def load_pretrained_unet(
    path: str | Path, data: DataConfig, model: ModelConfig | None = None, cross_attention_dim: int | None = None
):
    folder = _unet_folder(Path(path))
    if not folder.is_dir():
        raise MemsafeError(f"model.pretrained directory not found: {folder}")
    for required in ("config.json",):
        if not (folder / required).is_file():
            raise MemsafeError(f"model.pretrained directory {folder} is missing {required}")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise MemsafeError(f"model.pretrained directory {folder} has no weights file (*.safetensors)")
    cls = unet_class(model) if model is not None else UNet2DModel
    try:
        unet = cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise MemsafeError(f"cannot load UNet from {folder}: {exc}") from exc
    expected = getattr(unet.config, "cross_attention_dim", None)
    if cross_attention_dim is not None and expected != cross_attention_dim:
        raise MemsafeError(
            f"pretrained UNet at {folder} reads {expected}-d text embeddings, the text encoder gives {cross_attention_dim}-d"
        )
    from memsafe.models.pipeline import pipeline_index

    latent = pipeline_index(path) is not None  # channels and sizes checked against its VAE (models/pipeline.py)
    if not latent and (unet.config.in_channels != data.channels or unet.config.sample_size != data.resolution):
        raise MemsafeError(
            f"pretrained UNet at {folder} takes {unet.config.in_channels}x{unet.config.sample_size}px images, "
            f"data gives {data.channels}x{data.resolution}px"
        )
    return unet


def training_timesteps(model: ModelConfig) -> int:
    """The number of training timesteps of the run's scheduler (a pretrained one may differ from the config's)."""
    return build_noise_scheduler(model).config.num_train_timesteps


def build_noise_scheduler(model: ModelConfig) -> DDPMScheduler:
    if model.pretrained:
        scheduler_dir = Path(model.pretrained) / "scheduler"
        if scheduler_dir.is_dir():
            return DDPMScheduler.from_pretrained(scheduler_dir, local_files_only=True)
    return DDPMScheduler(num_train_timesteps=model.num_train_timesteps, beta_schedule=model.beta_schedule)
