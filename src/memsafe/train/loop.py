"""The one training loop: DDPM on a diffusers UNet, with AdamW, optional EMA, accelerate and hooks."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from memsafe.config import RunConfig
from memsafe.data.images import ImageSet
from memsafe.errors import MemsafeError
from memsafe.models.pipeline import is_latent_pipeline
from memsafe.models.unet import build_noise_scheduler, build_unet
from memsafe.train.hooks import HookList, TrainHook
from memsafe.train.loss import draw_noise, per_sample_diffusion_loss, weighted_mean
from memsafe.train.progress import run_display
from memsafe.train.sampler import EpochBatches


def use_deterministic_kernels() -> None:
    """Same inputs, same bits on CUDA as on the CPU (cuBLAS workspace, cuDNN and scatter/atomic kernels)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """The run's Accelerator. Without CUDA it is told so: accelerate only sets up multi-process CPU
    (gloo) training under torchrun / accelerate launch when `cpu=True`."""
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        # accelerate keeps one mixed-precision setting per Python process and refuses a second; a library
        # user may train runs of both kinds in one session. The distributed set-up (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def trained_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer and EMA hold: every weight, or under LoRA the adapter's alone."""
    return [p for p in model.parameters() if p.requires_grad]


def model_inputs(config: RunConfig, train_set: ImageSet, progress: bool = False) -> torch.Tensor:
    """What the denoiser learns to produce: images in [-1, 1], or a pipeline's cached VAE latents."""
    if not is_latent_pipeline(config.model):
        return train_set.as_model_input()
    from memsafe.data.latent_cache import cached_latents

    return cached_latents(train_set, config.model.pretrained, cache_dir=config.data.latent_cache, progress=progress)


class Trainer:
    """Owns the model, optimizer, EMA, data order and hooks of one training run."""

    def __init__(
        self,
        config: RunConfig,
        train_set: ImageSet,
        hooks: list[TrainHook] | tuple[TrainHook, ...] = (),
        accelerator: Accelerator | None = None,
        unet: torch.nn.Module | None = None,
        conditioner=None,
        data_parallel: bool = True,
        inputs: torch.Tensor | None = None,
    ):
        """`data_parallel=False` keeps this trainer to its own process (e.g. an IET proxy): the model is
        not wrapped for DDP, each step takes the whole batch and no collective is run. `unet`, `conditioner`
        and `inputs` (what model_inputs gives) may come from another trainer on the same data."""
        train = config.train
        if train.deterministic:
            use_deterministic_kernels()
        self.config = config
        self.train_set = train_set
        self.accelerator = accelerator or make_accelerator(train.mixed_precision)
        set_seed(train.seed)
        self.noise_scheduler = build_noise_scheduler(config.model)
        self.conditioner = conditioner
        cross_attention_dim = None
        if config.model.conditioning == "text" and conditioner is None:
            from memsafe.models.text import CaptionConditioner, TextEncoder

            encoder = TextEncoder(config.model.text_encoder, config.model.max_text_length)
            self.conditioner = CaptionConditioner(encoder, train_set.captions, train.caption_dropout)
            cross_attention_dim = encoder.dim
        model = unet
        if model is None:
            model = build_unet(config.model, config.data, cross_attention_dim)
            if config.model.lora_rank:
                from memsafe.models.lora import add_lora

                add_lora(model, config.model)
            if train.gradient_checkpointing:
                model.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(
            trained_parameters(model), lr=train.learning_rate, weight_decay=train.weight_decay
        )
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", optimizer=self.optimizer, num_warmup_steps=train.warmup_steps
        )
        self.data_parallel = data_parallel
        if self.data_parallel:
            self.unet, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        else:
            self.unet = model.to(self.accelerator.device)
            self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        self.ema = EMAModel(trained_parameters(self.unwrapped), decay=train.ema_decay) if train.ema else None
        self.use_subset(torch.arange(len(train_set)), seed=train.seed)
        self.hooks = HookList(hooks)
        if inputs is None:
            with self.accelerator.main_process_first():  # the others then read the cache it wrote
                inputs = model_inputs(config, train_set, progress=self.accelerator.is_main_process)
        self.pixels = inputs
        self.latent = is_latent_pipeline(config.model)  # self.pixels are VAE latents, not images
        self.step = 0
        self.last_log: dict[str, float] = {}

    def use_subset(self, indices: torch.Tensor, seed: int) -> None:
        """Train from now on only on these dataset indices (e.g. one shard), in a fresh seeded order."""
        self.batches = EpochBatches(
            indices,
            self.config.train.batch_size,
            seed=seed,
            rank=self.accelerator.process_index if self.data_parallel else 0,
            world_size=self.accelerator.num_processes if self.data_parallel else 1,
        )
        self.batch_position = 0

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.unet)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def next_batch(self) -> dict[str, Any]:
        """This process's share of the next global batch, with its noise, timesteps and caption dropout."""
        indices = self.batches.batch(self.batch_position)
        generator = self.batches.generator(self.batch_position)
        self.batch_position += 1
        size = self.batches.batch_size
        noise, timesteps = draw_noise(self.noise_scheduler, (size, *self.pixels.shape[1:]), generator)
        uniform = torch.rand(size, generator=generator)
        local = self.batches.local
        batch = {
            "pixels": self.pixels[indices].to(self.device),
            "index": indices,
            "noise": local(noise),
            "timesteps": local(timesteps),
            "generator": generator,
            "model_kwargs": {},
        }
        if self.train_set.captions is not None:
            batch["captions"] = [self.train_set.captions[i] for i in indices.tolist()]
        if self.conditioner is not None:
            batch["caption_dropped"] = self.conditioner.dropped(local(uniform))
            batch["model_kwargs"] = self.conditioner.model_kwargs(indices, self.device, batch["caption_dropped"])
        return batch

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; no update at all when the
        hooks skip every sample."""
        self.unet.train()
        micro_batches = self.config.train.gradient_accumulation_steps
        sums = {"loss": 0.0, "train_loss": 0.0}
        kept = torch.zeros((), device=self.device)
        samples = 0
        for micro in range(micro_batches):
            # Gradients are all-reduced once, on the last micro-batch.
            last = micro == micro_batches - 1
            sync = contextlib.nullcontext() if last or not self.data_parallel else self.accelerator.no_sync(self.unet)
            with sync:
                losses, weights, loss, drawn = self.backward_micro_batch(micro_batches)
            sums["loss"] += losses.detach().mean().item() / micro_batches
            sums["train_loss"] += loss.detach().item()
            kept = kept + weights.gt(0).float().sum()
            samples += drawn
        if self.data_parallel:
            any_kept = self.accelerator.reduce(kept.reshape(1), reduction="sum").item() > 0
        else:
            any_kept = kept.item() > 0
        if any_kept:
            self.hooks.on_after_backward(self.unwrapped, self)
            if self.config.train.grad_clip > 0:
                self.accelerator.clip_grad_norm_(self.unet.parameters(), self.config.train.grad_clip)
            self.optimizer.step()
            self.hooks.on_after_step(self.unwrapped, self)
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(self.unwrapped.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return sums | {"kept_fraction": (kept / samples).item(), "lr": self.lr_scheduler.get_last_lr()[0]}

    def backward_micro_batch(self, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Forward and backward of the next batch, its loss divided by the micro-batches per step; and how many
        draws it had before the hooks dropped any."""
        batch = self.hooks.on_batch_start(self.next_batch(), self)
        with self.accelerator.autocast():
            losses, _ = per_sample_diffusion_loss(
                self.unet, self.noise_scheduler, batch["pixels"], batch["noise"], batch["timesteps"],
                snr_gamma=self.config.train.snr_gamma, **batch["model_kwargs"],
            )
        if not torch.isfinite(losses).all():
            raise MemsafeError(
                f"training loss became {losses[~torch.isfinite(losses)][0].item()} at step {self.step}: "
                "lower train.learning_rate or check the data"
            )
        weights = self.hooks.on_losses(losses.detach(), batch, self)
        loss = weighted_mean(losses, weights) / micro_batches
        # Every process runs backward (keeps data-parallel all-reduces matched) even for an all-skipped batch.
        self.accelerator.backward(loss)
        return losses, weights, loss, batch.get("drawn", len(losses))

    def fit(
        self,
        max_steps: int | None = None,
        checkpoint_dir: Path | None = None,
        log_path: Path | None = None,
        progress: bool = True,
        on_checkpoint: Callable[[Path], None] | None = None,
    ) -> dict[str, float]:
        """Train until `max_steps` (default: the config's), checkpointing and logging on the way."""
        if self.step == 0:
            self.hooks.on_train_start(self)
        self._running: dict[str, float] = {}
        stats = drive(self, self.advance, "training", max_steps, checkpoint_dir, log_path, progress, on_checkpoint)
        self.hooks.on_sync(self)
        return stats

    def advance(self, max_steps: int, bar, log) -> None:
        """One optimizer step, with its share of the logging: `drive`'s unit of work for this trainer."""
        every = self.config.train.log_every
        for key, value in self.train_step().items():
            self._running[key] = self._running.get(key, 0.0) + value
        bar.update(1)
        if self.step % every == 0 or self.step == max_steps:
            count = every if self.step % every == 0 else self.step % every
            self.last_log = self.mean_over_processes({k: v / count for k, v in self._running.items()})
            self.last_log |= self.hooks.log_values()
            self._running = {}
            bar.set_postfix(loss=f"{self.last_log['loss']:.4f}", kept=f"{self.last_log['kept_fraction']:.2f}")
            log.write(self.step, self.last_log)

    def mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Logged values averaged over data-parallel processes (each saw its share of the batch)."""
        if not self.data_parallel or self.accelerator.num_processes == 1:
            return values
        keys = sorted(values)
        stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self.accelerator.reduce(stacked, reduction="mean").tolist()))

    def save_checkpoint(self, root: Path) -> Path:
        from memsafe.train.checkpoint import save_checkpoint

        self.hooks.on_sync(self)
        return save_checkpoint(self, root)

    def load_checkpoint(self, path: Path) -> None:
        from memsafe.train.checkpoint import load_checkpoint

        load_checkpoint(self, path)

    def ema_or_model(self, use_ema: bool) -> torch.nn.Module:
        """A copy of the weights to sample from: the EMA shadow when asked and kept, else the model."""
        import copy

        self.hooks.on_sync(self)
        model = copy.deepcopy(self.unwrapped).eval()
        if use_ema and self.ema is not None:
            self.ema.copy_to(trained_parameters(model))
        return model


def drive(
    trainer,
    advance: Callable[[int, object, object], None],
    desc: str,
    max_steps: int | None,
    checkpoint_dir: Path | None,
    log_path: Path | None,
    progress: bool,
    on_checkpoint: Callable[[Path], None] | None,
) -> dict[str, float]:
    """The skeleton every trainer runs (train.protocol.TrainerLike): `advance(max_steps, bar, log)` until
    `trainer.step` reaches `max_steps` optimizer steps (default: the config's), a checkpoint whenever the step
    count passes a multiple of `train.checkpoint_every` and at the end, one progress bar and one log, written
    by the main process."""
    train = trainer.config.train
    max_steps = max_steps if max_steps is not None else train.max_steps
    started, first_step = time.perf_counter(), trainer.step
    main = trainer.accelerator.is_main_process
    with run_display(max_steps, trainer.step, desc, progress and main, log_path if main else None) as (bar, log):
        while trainer.step < max_steps:
            before = trainer.step
            advance(max_steps, bar, log)
            passed = trainer.step // train.checkpoint_every > before // train.checkpoint_every
            if checkpoint_dir is not None and (passed or trainer.step >= max_steps):
                path = trainer.save_checkpoint(checkpoint_dir)
                if on_checkpoint:
                    on_checkpoint(path)
    steps_run = trainer.step - first_step
    elapsed = time.perf_counter() - started
    return {"steps": trainer.step, "sec_per_step": elapsed / steps_run if steps_run else math.nan}
