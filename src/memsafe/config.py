"""Run configuration: dataclasses loaded from YAML, with unknown keys and wrong types rejected by name."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memsafe.errors import MemsafeError


@dataclass
class DataConfig:
    source: str = "builtin:digits"  # "builtin:digits" or a folder of images (diffusers convention)
    resolution: int = 16
    channels: int = 1
    max_train_images: int | None = None  # random subset of this size (seeded), the rest may be held out
    holdout_images: int = 0  # real images kept out of training, the FID reference
    center_crop: bool = True
    exclude_text: list[str] = field(default_factory=list)  # drop training images whose caption has any of these
    # keep only this share (seeded) of the training images whose caption has the word (scarce content) ...
    thin_text: dict[str, float] = field(default_factory=dict)
    thin_except_text: list[str] = field(default_factory=list)  # ... sparing those whose caption has any of these
    seed: int = 0


@dataclass
class ModelConfig:
    pretrained: str | None = None  # a local diffusers directory (model_index.json + unet/, or a UNet folder)
    conditioning: str = "none"  # "none" (UNet2DModel) or "text" (UNet2DConditionModel + frozen text encoder)
    text_encoder: str = "builtin:minilm"  # or a local directory (Stable Diffusion's text_encoder/ + tokenizer/)
    max_text_length: int = 16
    lora_rank: int | None = None  # None: full fine-tuning; else a peft LoRA adapter of this rank on the UNet
    lora_alpha: float | None = None  # None: equal to the rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
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
    ema: bool = False
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # "no", "fp16", "bf16" (accelerate)
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
    use_ema: bool = True  # evaluate the EMA weights when the run kept them
    memorization_threshold: float = 1 / 3  # NN1/NN2 distance ratio below which a sample is a copy
    copy_threshold: float = 0.5  # cosine similarity above which a sample is a copy
    features: str = "domain"  # "domain" (trained by memsafe on the data) or a path to a TorchScript file
    inception_weights: str | None = None  # FID with Inception-v3 when these weights are on disk
    grid_size: int = 16
    seed: int = 1234


@dataclass
class IETConfig:
    """IET-AGC+ (sample-level defense); every component can be switched off for ablation."""

    shards: int = 10  # K proxies, as in the reference code's CIFAR runs
    local_steps: int = 100  # optimizer steps per proxy per round
    agc: bool = True  # skip samples with loss < bank[t] / agc_ratio
    agc_ratio: float | None = None  # lambda; None: 2.0 from scratch, 1.25 when fine-tuning (reference code)
    bank_decay: float = 0.8  # EMA of the per-timestep loss bank
    redistribute: bool = True  # AGC+: move persistently skipped samples to other shards between rounds
    redistribute_threshold: float = 0.5  # share of a sample's visits in a round that were skipped
    augment: bool = True  # AGC+: augmentation strength grows as a sample's loss falls
    augment_flip: bool = False  # horizontal flips (off for digits and text, whose meaning a flip changes)
    # Full-strength translation (fraction of the image) and brightness/contrast change. Kept small: on the
    # demo digits a 2-pixel shift doubled FID, sub-pixel shifts did not (bench/results/sweeps/).
    augment_max_shift: float = 0.03
    augment_max_jitter: float = 0.05


@dataclass
class GradientProjectionConfig:
    """Concept-level defense: updates of layers that read text embeddings lose their concept component."""

    concepts: list[str] = field(default_factory=list)  # prompts naming the prohibited concepts (several each)
    concept_images: list[str] = field(default_factory=list)  # needs a joint text-image encoder (not yet)
    neutral: list[str] = field(default_factory=lambda: ["", "a photo", "an image of", "a picture of something"])
    strength: float = 1.0  # the projection strength (lambda in the method's equations); 1 removes the component
    rank: int | None = None  # basis size; None: smallest rank holding `energy` of the concept spectrum
    energy: float = 0.95
    neutral_energy: float = 0.99
    layers: list[str] = field(default_factory=lambda: ["attn2.to_k", "attn2.to_v"])  # module-name suffixes
    # "update": project the optimizer's update (exact); "gradient": project gradients; "both": gradients,
    # so AdamW's moments see only the allowed part, and the update (exact)
    mode: str = "update"
    # Training captions that name no concept join the neutral prompts: their directions stay learnable.
    neutral_captions: bool = True
    # Extensions beyond the paper's key/value projection, off by default (measured in bench/gradproj.py):
    # add the directions by which naming a concept changes the other tokens of its training captions (a
    # bidirectional encoder spreads a phrase into its whole caption) ...
    counterfactual: bool = False
    # ... and train on caption embeddings with their concept component removed (scaled by 1 - lambda), so the
    # layers after the frozen keys/values cannot learn to decode the concept from them either.
    project_inputs: bool = False
    # "text": the concepts' text-embedding subspace, on the layers that read text (`layers`). "activations":
    # every trainable layer gets the subspace by which naming a concept changes its inputs
    # (concept_activations.py), from `activation_samples` training captions with a concept prompt appended,
    # keeping `activation_energy` of each layer's difference energy; `layers` does not apply.
    space: str = "text"
    # "all": every sample's gradient is projected (the guarantee). "concept_samples": only the share of the
    # samples whose caption names a concept (concept_samples.py); `mode` does not apply, no guarantee.
    scope: str = "all"
    activation_samples: int = 256
    activation_energy: float = 0.99
    # Keep instead only the directions along which the concept moves a layer's inputs more than switching
    # to another training caption does (allowed content keeps the rest; activation_energy does not apply).
    activation_allowed: bool = False
    # mode "update" only: project the update accumulated over this many steps at once (and before any
    # checkpoint, IET aggregation or the end of training), so the hook costs 1/N per step. W u = W0 u holds
    # at those points; between them the weights may drift along the subspace.
    project_every: int = 1
    # Add a private "sink" vector to the last token of every training sample whose caption names a concept:
    # a direction that no projected weight is frozen along and that the text encoder's tokens use least. With
    # the text route frozen, the concept images' content needs an explanation; the sink gives it one that no
    # prompt produces, instead of allowed content that comes with it (bench/gradproj.py measures it).
    sink: bool = False
    sink_scale: float = 1.0  # the sink's norm, in RMS norms of the text tokens


@dataclass
class DefenseConfig:
    name: str = "none"  # "none", "iet_agc", "gradient_projection"; several joined by "+"
    iet_agc: IETConfig = field(default_factory=IETConfig)
    gradient_projection: GradientProjectionConfig = field(default_factory=GradientProjectionConfig)

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in self.name.split("+") if n.strip() and n.strip() != "none"]


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


def merge(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A new config with dotted-key overrides applied, e.g. {"train.max_steps": 10}."""
    values = config.to_dict()
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config_from_dict(values)


def validate(config: RunConfig) -> None:
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
    iet = config.defense.iet_agc
    if iet.shards < 1 or iet.local_steps < 1:
        raise MemsafeError("defense.iet_agc.shards and local_steps must be at least 1")
    if iet.agc_ratio is not None and iet.agc_ratio < 1.0:
        raise MemsafeError(
            f"defense.iet_agc.agc_ratio {iet.agc_ratio} < 1 would skip samples whose loss is above the running "
            "mean, i.e. nearly every sample; use a value >= 1 (2.0 from scratch, 1.25 when fine-tuning)"
        )
    if not 0.0 < iet.redistribute_threshold <= 1.0:
        raise MemsafeError(f"defense.iet_agc.redistribute_threshold must be in (0, 1], got {iet.redistribute_threshold}")
    gp = config.defense.gradient_projection
    if not 0.0 <= gp.strength <= 1.0:
        raise MemsafeError(f"defense.gradient_projection.strength must be in [0, 1], got {gp.strength}")
    if gp.mode not in ("update", "gradient", "both"):
        raise MemsafeError(f"defense.gradient_projection.mode must be update, gradient or both, got {gp.mode!r}")
    if gp.scope not in ("all", "concept_samples"):
        raise MemsafeError(f"defense.gradient_projection.scope must be all or concept_samples, got {gp.scope!r}")
    if gp.space not in ("text", "activations"):
        raise MemsafeError(f"defense.gradient_projection.space must be text or activations, got {gp.space!r}")
    if gp.space == "activations" and (gp.project_inputs or gp.counterfactual):
        raise MemsafeError("defense.gradient_projection.project_inputs and counterfactual apply to space: text only")
    if gp.sink_scale <= 0:
        raise MemsafeError(f"defense.gradient_projection.sink_scale must be positive, got {gp.sink_scale}")
    if gp.project_every < 1:
        raise MemsafeError(f"defense.gradient_projection.project_every must be at least 1, got {gp.project_every}")
    if gp.project_every > 1 and (gp.mode != "update" or gp.scope != "all" or config.train.ema):
        raise MemsafeError("defense.gradient_projection.project_every > 1 needs mode: update, scope: all and "
                           "train.ema: false (the other modes and the EMA act on every step)")
    if not 0 < gp.activation_energy <= 1 or gp.activation_samples < 1:
        raise MemsafeError("defense.gradient_projection.activation_energy must be in (0, 1] and activation_samples at least 1")
    if model.lora_rank is not None and model.lora_rank < 1:
        raise MemsafeError(f"model.lora_rank must be at least 1, got {model.lora_rank}")
    if config.eval.num_samples <= 0:
        raise MemsafeError(f"eval.num_samples must be positive, got {config.eval.num_samples}")
