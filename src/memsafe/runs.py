"""Run directories: train into one, evaluate it, sample from it.

A run directory holds `config.yaml` (resolved), `status.json`, `log.jsonl`, `checkpoints/`, `model/`
(a diffusers DDPMPipeline; `model_ema/` too when EMA is on), and after evaluation `metrics.json`,
`report.md` / `report.html`, the measured samples (`samples/`, `samples.npz`) and the PNG figures. Only
`status.json` with "complete" says the training finished. One process at a time writes it (run_lock.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from diffusers import DDPMPipeline

from memsafe.config import RunConfig, config_from_dict
from memsafe.data import ImageSet, load_dataset, load_images
from memsafe.defenses import build_trainer, selected
from memsafe.errors import MemsafeError
from memsafe.metrics.evaluate import Evaluation, evaluate_samples
from memsafe.models.pipeline import is_latent_pipeline
from memsafe.models.sampling import generate
from memsafe.models.unet import build_noise_scheduler, unet_class
from memsafe.report.document import write_run_report
from memsafe.report.quality import compare_with_undefended
from memsafe.report.figures import save_image_grid, save_nearest_grid
from memsafe.run_lock import LOCK_NAME, hold_run_directory
from memsafe.train.checkpoint import WRITE_ERRORS, latest_checkpoint

RESUMABLE_CHANGES = {"train.max_steps", "output_dir"}


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_status(run_dir: Path) -> dict:
    path = run_dir / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {"status": "missing"}


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise MemsafeError(f"{run_dir} is not a memsafe run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def _check_resumable(run_dir: Path, config: RunConfig) -> None:
    previous = _flatten(load_run_config(run_dir).to_dict())
    current = _flatten(config.to_dict())
    changed = sorted(k for k in current if previous.get(k) != current[k] and k not in RESUMABLE_CHANGES)
    if changed:
        raise MemsafeError(
            f"{run_dir} holds a run with a different config ({', '.join(changed)}); choose another output_dir"
        )


def train_run(config: RunConfig, progress: bool = True) -> Path:
    """Train (or resume) the run in `config.output_dir`; returns the run directory.

    Under `accelerate launch` / `torchrun` every process calls this; only the main one writes files."""
    # Everything that can fail on bad input happens before the run directory is touched.
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    accelerator = trainer.accelerator
    run_dir = Path(config.output_dir)
    if (run_dir / "config.yaml").exists():
        _check_resumable(run_dir, config)
    elif run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise MemsafeError(f"output_dir {run_dir} exists and is not a memsafe run; choose another output_dir")
    accelerator.wait_for_everyone()  # every process has read the directory before the main one writes
    with hold_run_directory(run_dir, "train", accelerator):
        _train_held(config, trainer, run_dir, progress)
    accelerator.wait_for_everyone()
    return run_dir


def _train_held(config: RunConfig, trainer, run_dir: Path, progress: bool) -> None:
    """The part of `train_run` done while this process holds the run directory."""
    accelerator = trainer.accelerator
    main = accelerator.is_main_process

    def status(value: dict) -> None:
        if main:
            write_json(run_dir / "status.json", value)

    earlier = read_status(run_dir).get("train_seconds", 0.0)  # wall time of the invocations before this one
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    started = time.perf_counter()
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
    status({"status": "running", "step": trainer.step})
    try:
        stats = trainer.fit(
            checkpoint_dir=run_dir / "checkpoints",
            log_path=run_dir / "log.jsonl",
            progress=progress,
            on_checkpoint=lambda path: status({"status": "running", "step": trainer.step}),
        )
        if main:
            save_pipeline(trainer.ema_or_model(use_ema=False), trainer, run_dir / "model")
            if trainer.ema is not None:
                save_pipeline(trainer.ema_or_model(use_ema=True), trainer, run_dir / "model_ema")
    except BaseException as exc:
        status({"status": "failed", "step": trainer.step, "error": str(exc) or repr(exc)})
        raise
    status({"status": "complete", "step": trainer.step, "final_loss": trainer.last_log.get("loss"),
            "processes": accelerator.num_processes, "train_seconds": earlier + time.perf_counter() - started, **stats})


def save_pipeline(unet: torch.nn.Module, trainer, path: Path) -> None:
    """unet/ and scheduler/ in diffusers layout; for unconditional runs a loadable DDPMPipeline; for pipeline
    runs a StableDiffusionPipeline folder or LoRA weights (models/pipeline.py)."""
    from memsafe.models.lora import has_lora, merged_copy
    from memsafe.models.pipeline import save_latent_model

    model = trainer.config.model
    latent = is_latent_pipeline(model)
    if has_lora(unet) and not latent:
        unet = merged_copy(unet)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if latent:
            save_latent_model(unet, model.pretrained, tmp, merged=model.lora_merged)
        elif trainer.conditioner is None:
            DDPMPipeline(unet=unet, scheduler=trainer.noise_scheduler).save_pretrained(tmp)
        else:
            unet.save_pretrained(tmp / "unet")
            trainer.noise_scheduler.save_pretrained(tmp / "scheduler")
    except WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MemsafeError(f"could not write model {path}: {exc}") from exc
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_run_unet(run_dir: Path, config: RunConfig) -> torch.nn.Module:
    status = read_status(run_dir)
    if status["status"] != "complete":
        raise MemsafeError(f"run {run_dir} is not complete (status: {status['status']}); train it first")
    folder = run_dir / ("model_ema" if config.eval.use_ema and (run_dir / "model_ema").is_dir() else "model")
    if is_latent_pipeline(config.model):
        from memsafe.models.pipeline import load_latent_unet

        return load_latent_unet(folder, config.model.pretrained)
    return unet_class(config.model).from_pretrained(folder / "unet", local_files_only=True).eval()



def prompt_sampler(unet: torch.nn.Module, config: RunConfig, seed: int, progress: bool = False,
                   last_token_offset: torch.Tensor | None = None, encoder=None, codec=None):
    """A function from prompts (and a guidance scale, default the run's eval.guidance_scale) to one model-range
    image each, sampled from the text-conditional `unet` with the run's text encoder and sampler; the encoder
    is loaded once for every call.
    `last_token_offset` (d,) is added to every prompt's last token embedding (e.g. a gradient-projection sink,
    to measure what the weights hold behind it). `encoder` and `codec` (a pipeline run's VAE): the run's,
    loaded here unless given."""
    encoder = caption_encoder(config) if encoder is None else encoder
    codec = latent_codec(config) if codec is None else codec
    noise_scheduler = build_noise_scheduler(config.model)
    uncond = encoder.encode([""])

    def embed(prompts: list[str]) -> torch.Tensor:
        states = encoder.encode(prompts)
        if last_token_offset is not None:
            states[:, -1] += last_token_offset.to(states)
        return states

    def sample(prompts: list[str], guidance_scale: float | None = None) -> torch.Tensor:
        samples = generate(
            unet,
            noise_scheduler,
            len(prompts),
            steps=config.eval.sampling_steps,
            batch_size=config.eval.batch_size,
            seed=seed,
            progress=progress,
            encoder_hidden_states=embed(prompts),
            uncond_hidden_states=uncond,
            guidance_scale=config.eval.guidance_scale if guidance_scale is None else guidance_scale,
            size=None if codec is None else config.data.resolution // codec.factor,
            clamp=codec is None,
        )
        return samples if codec is None else codec.decode(samples)

    return sample


class FinishedRun:
    """A finished run's parts, each loaded on first use and kept: an evaluation's measurements (samples, the
    guidance and concept attacks, membership, held-out loss) share one UNet, text encoder and VAE."""

    def __init__(self, run_dir: Path, config: RunConfig | None = None):
        self.dir = Path(run_dir)
        self.config = config or load_run_config(self.dir)

    @cached_property
    def unet(self) -> torch.nn.Module:
        return load_run_unet(self.dir, self.config)

    @cached_property
    def encoder(self):
        return caption_encoder(self.config)

    @cached_property
    def codec(self):
        return latent_codec(self.config)

    def to_model(self, images: ImageSet) -> torch.Tensor:
        """What the UNet denoises: the images in [-1, 1], or their VAE latents for a pipeline run."""
        if self.codec is None:
            return images.as_model_input()
        return torch.cat([self.codec.encode(chunk) for chunk in images.as_model_input().split(16)])

    def sampler(self, seed: int, progress: bool = False, last_token_offset: torch.Tensor | None = None):
        """`prompt_sampler` of a text run."""
        return prompt_sampler(self.unet, self.config, seed, progress, last_token_offset, self.encoder, self.codec)


def finished(run: Path | FinishedRun) -> FinishedRun:
    return run if isinstance(run, FinishedRun) else FinishedRun(run)


def run_prompt_sampler(run_dir: Path, seed: int, last_token_offset: torch.Tensor | None = None):
    """`prompt_sampler` for a finished text run."""
    return FinishedRun(run_dir).sampler(seed, last_token_offset=last_token_offset)


def run_heldout_loss(run: Path | FinishedRun, images: ImageSet) -> torch.Tensor:
    """Per-image held-out denoising loss of a finished run (metrics/heldout.py) on `images`, in the space its
    UNet denoises (VAE latents for a pipeline run), under their captions in a text run."""
    from memsafe.metrics.heldout import heldout_denoising_loss

    run = finished(run)
    if run.encoder is not None and not images.captions:
        raise MemsafeError(f"held-out loss of a text run needs captioned images (run {run.dir})")
    return heldout_denoising_loss(run.unet, build_noise_scheduler(run.config.model), run.encoder,
                                  run.to_model(images), images.captions if run.encoder else None)


def caption_encoder(config: RunConfig):
    """The run's frozen text encoder, or None for an unconditional run."""
    if config.model.conditioning != "text":
        return None
    from memsafe.models.text import TextEncoder

    return TextEncoder(config.model.text_encoder, config.model.max_text_length)


def latent_codec(config: RunConfig):
    """A pipeline run's frozen VAE (models.pipeline.LatentCodec), or None for a pixel-space run."""
    if not is_latent_pipeline(config.model):
        return None
    from memsafe.models.pipeline import LatentCodec

    return LatentCodec(config.model.pretrained)


def run_membership(run: FinishedRun, train_set: ImageSet, holdout: ImageSet) -> dict[str, Any]:
    """The loss membership-inference attack (metrics/membership.py) of a finished run: as many training as
    held-out images, the i-th of each noised alike, under their own captions in a text run."""
    from memsafe.metrics.membership import attack_losses, balanced_sets, loss_attack

    config = run.config
    if not config.eval.membership or len(holdout) < 2:
        return {}
    member_indices, nonmember_indices = balanced_sets(len(train_set), len(holdout), config.eval.seed)
    noise_scheduler = build_noise_scheduler(config.model)

    def losses(images: ImageSet) -> torch.Tensor:
        hidden = run.encoder.encode_unique(images.captions) if run.encoder is not None else None
        return attack_losses(run.unet, noise_scheduler, run.to_model(images), hidden, seed=config.eval.seed)

    return loss_attack(losses(train_set.subset(member_indices)), losses(holdout.subset(nonmember_indices)))


def draw_prompts(config: RunConfig, num_images: int, seed: int, prompts: list[str] | None = None) -> list[str]:
    """The prompt of each generation of a text run: `prompts` cycled over `num_images`, or training captions
    drawn with `seed`."""
    if prompts is None:
        captions = load_dataset(config.data)[0].captions or [""]
        pick = torch.randint(len(captions), (num_images,), generator=torch.Generator().manual_seed(seed))
        return [captions[i] for i in pick.tolist()]
    return [prompts[i % len(prompts)] for i in range(num_images)]


def sample_run(
    run: Path | FinishedRun, num_images: int, seed: int, prompts: list[str] | None = None, progress: bool = True,
    guidance_scale: float | None = None,
) -> tuple[torch.Tensor, list[str] | None]:
    """(samples, their prompts) from a finished run; a text run without `prompts` uses training captions
    drawn with `seed`, and `guidance_scale` (default the run's eval.guidance_scale)."""
    run = finished(run)
    config = run.config
    if config.model.conditioning != "text" and (prompts or guidance_scale is not None):
        raise MemsafeError(f"run {run.dir} is unconditional: it takes no prompts and no guidance scale")
    if guidance_scale is not None:
        if guidance_scale < 1.0:
            raise MemsafeError(f"guidance scale must be at least 1 (1: no guidance), got {guidance_scale}")
    if config.model.conditioning != "text":
        samples = generate(
            run.unet,
            build_noise_scheduler(config.model),
            num_images,
            steps=config.eval.sampling_steps,
            batch_size=config.eval.batch_size,
            seed=seed,
            progress=progress,
        )
        return samples, None
    prompts = draw_prompts(config, num_images, seed, prompts)
    return run.sampler(seed, progress)(prompts, guidance_scale), prompts


def write_samples(samples: torch.Tensor, folder: Path, seed: int, prompts: list[str] | None = None) -> Path:
    """Samples as `folder/00000.png ...` plus `folder.npz` beside it (uint8 NHWC `images`, `seed`, `prompts`),
    so a measurement can be repeated on the very images it was made on. Returns the .npz path."""
    from PIL import Image

    from memsafe.data.images import to_uint8

    arrays = to_uint8(samples).permute(0, 2, 3, 1).numpy()
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(tmp / f"{i:05d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    archive = folder.with_name(f"{folder.name}.npz")
    np.savez_compressed(archive, images=arrays, seed=np.int64(seed), prompts=np.array(prompts or [], dtype=str))
    return archive


def evaluate_run(run_dir: Path, progress: bool = True) -> Evaluation:
    """Generate, measure and write metrics.json, report.md / report.html, the samples (`samples/` and
    `samples.npz`) and the figures into the run."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    with hold_run_directory(run_dir, "evaluate"):
        return _evaluate_held(run_dir, config, progress)


def _evaluate_held(run_dir: Path, config: RunConfig, progress: bool) -> Evaluation:
    started = time.perf_counter()
    run = FinishedRun(run_dir, config)
    samples, prompts = sample_run(run, config.eval.num_samples, config.eval.seed, progress=progress)
    write_samples(samples, run_dir / "samples", config.eval.seed, prompts)
    all_images = load_images(config.data)
    train_set, holdout = load_dataset(config.data, all_images)
    real_images = None if config.data.holdout_source else all_images  # None: training + held-out images
    evaluation = evaluate_samples(samples, train_set, holdout, config.eval, progress=progress, real_images=real_images)
    status = read_status(run_dir)
    evaluation.metrics |= {
        "defense": config.defense.name,
        "data_source": config.data.source,
        "eval_seed": config.eval.seed,
        "train_steps": status.get("step"),
        "sec_per_step": status.get("sec_per_step"),
        "final_loss": status.get("final_loss"),
    }
    save_nearest_grid(
        samples,
        evaluation.reference.images,
        evaluation.neighbours.indices[:, 0],
        evaluation.ratios,
        run_dir / "nearest.png",
        count=config.eval.grid_size,
        threshold=config.eval.memorization_threshold,
    )
    save_image_grid(samples[:64], run_dir / "samples.png", title=f"{config.defense.name}: samples")
    evaluation.metrics |= measure_concept_if_known(run, progress)
    evaluation.metrics |= guidance_attack(run, prompts, train_set, holdout, evaluation, progress)
    evaluation.metrics |= run_membership(run, train_set, holdout)
    if len(holdout) and (config.model.conditioning != "text" or holdout.captions):
        evaluation.metrics["heldout_loss"] = run_heldout_loss(run, holdout).mean().item()
    defenses = selected(config.defense.names)
    for defense in defenses:
        if defense.evaluate is not None:
            evaluation.metrics |= defense.evaluate(run_dir, config)
    evaluation.metrics |= compare_with_undefended(run_dir, evaluation.metrics, config.data.source)
    evaluation.metrics["eval_seconds"] = time.perf_counter() - started
    log_path = run_dir / "log.jsonl"
    log_rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else []
    write_json(run_dir / "metrics.json", evaluation.metrics)
    write_run_report(run_dir, evaluation.metrics, log_rows, [d.report for d in defenses if d.report is not None])
    return evaluation


def guidance_attack(run: FinishedRun, prompts: list[str] | None, train_set: ImageSet, holdout: ImageSet,
                    evaluation: Evaluation, progress: bool) -> dict[str, Any]:
    """A text run's copies (metrics.evaluate.COPY_READINGS) on the same prompts and seed at each of
    `eval.attack_guidance_scales` (at `eval.guidance_scale`, those of the evaluation's samples), and the highest
    of each reading with its scale (`<reading>_worst`, `<reading>_worst_guidance`)."""
    from memsafe.metrics.evaluate import COPY_READINGS, copy_readings

    config = run.config
    scales = config.eval.attack_guidance_scales
    if config.model.conditioning != "text" or not scales:
        return {}
    sample = run.sampler(config.eval.seed, progress)
    own = config.eval.guidance_scale
    by_scale = {own: {key: evaluation.metrics[key] for key in COPY_READINGS if key in evaluation.metrics}}
    for scale in sorted(set(scales) - {own}):
        by_scale[scale] = copy_readings(sample(prompts, scale), evaluation, train_set, holdout, config.eval)
    found: dict[str, Any] = {"guidance_copies": {f"{scale:g}": by_scale[scale] for scale in sorted(by_scale)}}
    for key in by_scale[own]:
        worst = max(sorted(by_scale), key=lambda scale: by_scale[scale][key])
        found[f"{key}_worst"], found[f"{key}_worst_guidance"] = by_scale[worst][key], worst
    return found


def measure_concept_if_known(run: FinishedRun, progress: bool) -> dict[str, Any]:
    """The concept-extraction attack, for text runs on built-in concept data (whose detector memsafe trains):
    extraction rate, base rate and allowed accuracy."""
    from memsafe.metrics.extraction import attack_for, measure_concept

    config = run.config
    attack = attack_for(config.data.source)
    if config.model.conditioning != "text" or attack is None:
        return {}
    from memsafe.metrics.attributes import ink_digit_detector

    detector = ink_digit_detector(config.data.resolution, progress=progress)
    measured = measure_concept(
        run.sampler(config.eval.seed),
        detector,
        attack,
        per_prompt=2,
    )
    return measured
