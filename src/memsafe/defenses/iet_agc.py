"""IET-AGC+: sample-level memorization defense by shard-ensemble training (see shared/research/ietagc.md).

- IET: the training set is split into K shards; each round, K proxy models start from the global weights,
  each trains on its own shard, and the global model becomes their average weighted by shard size.
  A user's image reaches only the proxy of its shard.
- AGC (reference code, exact): each proxy keeps a per-timestep loss bank (EMA 0.8, starting at 0); a sample
  is skipped when its loss is below bank[t] / lambda; the bank is updated with every sample afterwards.
- AGC+ redistribution: samples skipped in at least `redistribute_threshold` of their visits in a round
  move to another shard, whose proxy has not fit them yet. The paper's exact rule was not recoverable;
  this one follows its description (ietagc.md section 3).
- AGC+ augmentation: a sample's augmentation strength rises from 0 (loss at or above the bank's running
  mean) to 1 (loss at the skipping threshold), from the relative loss seen at its last visit.

Differences from the reference, by design: a batch whose samples are all skipped makes no update (the
reference still steps Adam on a zero loss, so momentum keeps moving the weights); per-sample skip counts
are recorded (commented out in the reference).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from memsafe.progress import progress_bar

from memsafe.config import IETConfig, RunConfig
from memsafe.data.images import ImageSet
from memsafe.errors import MemsafeError
from memsafe.models.unet import build_noise_scheduler
from memsafe.train.checkpoint import atomic_checkpoint, load_checkpoint, read_state, write_state, write_trainer_state
from memsafe.train.hooks import TrainHook
from memsafe.train.loop import Trainer, make_accelerator
from memsafe.train.progress import JsonLines, run_display


def split_shards(num_items: int, shards: int, seed: int) -> torch.Tensor:
    """Shard id of every sample: a seeded random partition into `shards` parts whose sizes differ by <= 1."""
    if shards > num_items:
        raise MemsafeError(f"defense.iet_agc.shards {shards} is larger than the number of training images ({num_items})")
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    assignment = torch.empty(num_items, dtype=torch.long)
    assignment[order] = torch.arange(num_items) % shards
    return assignment


def agc_ratio(config: RunConfig) -> float:
    """lambda: the configured value, else the reference code's 2.0 from scratch and 1.25 for fine-tuning."""
    ratio = config.defense.iet_agc.agc_ratio
    return ratio if ratio is not None else (1.25 if config.model.pretrained else 2.0)


class SampleLedger:
    """Per-sample statistics over the whole training set (global indices), shared by all proxies."""

    def __init__(self, num_items: int):
        self.skips = torch.zeros(num_items, dtype=torch.long)
        self.visits = torch.zeros(num_items, dtype=torch.long)
        self.round_skips = torch.zeros(num_items, dtype=torch.long)
        self.round_visits = torch.zeros(num_items, dtype=torch.long)
        self.relative_loss = torch.full((num_items,), math.inf)  # loss / bank[t] at the last visit

    def start_round(self) -> None:
        self.round_skips.zero_()
        self.round_visits.zero_()

    def record(self, index: torch.Tensor, kept: torch.Tensor, relative: torch.Tensor) -> None:
        self.round_visits.index_add_(0, index, torch.ones_like(index))
        self.round_skips.index_add_(0, index, (~kept).long())
        self.relative_loss[index] = relative.float()

    def end_round(self, accelerator: Accelerator | None = None) -> None:
        """Adds the round to the totals. Each process saw only its proxies' shards: the round counts are
        summed over processes and every sample's last relative loss comes from the process that visited it."""
        if accelerator is not None and accelerator.num_processes > 1:
            visited = self.round_visits > 0
            counts = accelerator.reduce(torch.stack([self.round_visits, self.round_skips]), reduction="sum")
            relative = accelerator.reduce(torch.where(visited, self.relative_loss.double(), 0.0), reduction="sum")
            self.round_visits.copy_(counts[0])
            self.round_skips.copy_(counts[1])
            self.relative_loss = torch.where(self.round_visits > 0, relative.float(), self.relative_loss)
        self.visits += self.round_visits
        self.skips += self.round_skips

    def round_skip_rate(self) -> torch.Tensor:
        return self.round_skips.double() / self.round_visits.clamp_min(1).double()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("skips", "visits", "round_skips", "round_visits", "relative_loss")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            getattr(self, key).copy_(value)


class LossBank:
    """Running per-timestep loss of one proxy, as in the reference: starts at 0, EMA with `decay`."""

    def __init__(self, num_timesteps: int, decay: float):
        self.values = torch.zeros(num_timesteps, dtype=torch.float64)
        self.decay = decay

    def relative(self, losses: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        bank = self.values[timesteps]
        return torch.where(bank > 0, losses.double() / bank.clamp_min(1e-30), torch.full_like(bank, math.inf))

    def update(self, losses: torch.Tensor, timesteps: torch.Tensor) -> None:
        # Sequential, as the reference: two samples with the same t both enter the average.
        for t, loss in zip(timesteps.tolist(), losses.double().tolist()):
            self.values[t] = self.decay * self.values[t] + (1 - self.decay) * loss


class AntiGradientControl(TrainHook):
    """Skips a sample when loss * lambda < bank[t]; with `skip=False` it only keeps the statistics."""

    name = "agc"

    def __init__(self, bank: LossBank, ledger: SampleLedger, ratio: float, skip: bool = True):
        self.bank, self.ledger, self.ratio, self.skip = bank, ledger, ratio, skip
        self.kept = 0
        self.seen = 0

    def on_losses(self, losses, batch, trainer):
        losses, timesteps, index = losses.cpu(), batch["timesteps"].cpu(), batch["index"].cpu()
        relative = self.bank.relative(losses, timesteps)
        kept = relative * self.ratio >= 1.0 if self.skip else torch.ones_like(losses, dtype=torch.bool)
        self.bank.update(losses, timesteps)
        self.ledger.record(index, kept, relative)
        self.kept += int(kept.sum())
        self.seen += len(kept)
        return kept.float() if self.skip else None

    def take_skip_rate(self) -> float:
        rate = 1.0 - self.kept / self.seen if self.seen else 0.0
        self.kept = self.seen = 0
        return rate

    def state_dict(self):
        return {"bank": self.bank.values}

    def load_state_dict(self, state):
        if "bank" in state:
            self.bank.values.copy_(state["bank"])


def augmentation_strength(relative_loss: torch.Tensor, ratio: float) -> torch.Tensor:
    """0 when a sample's loss is at or above the bank's running mean (relative loss >= 1), rising linearly
    to 1 at the skipping threshold (relative loss 1 / lambda) and staying 1 below it. Never-seen samples
    (relative loss inf) get 0. Monotone: a lower loss never gets weaker augmentation."""
    threshold = 1.0 / ratio
    span = max(1.0 - threshold, 1e-6)
    strength = (1.0 - relative_loss.double()) / span
    return strength.clamp(0.0, 1.0).nan_to_num(0.0).float()


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
        strength = augmentation_strength(self.ledger.relative_loss[batch["index"].cpu()], self.ratio)
        self.strength_sum += float(strength.sum())
        self.count += len(strength)
        batch["pixels"] = augment_batch(
            batch["pixels"], strength.to(batch["pixels"].device), self.config, batch.get("generator")
        )
        return batch

    def log_values(self):
        mean = self.strength_sum / self.count if self.count else 0.0
        self.strength_sum, self.count = 0.0, 0
        return {"augment_strength": mean}


def redistribute(assignment: torch.Tensor, skip_rate: torch.Tensor, threshold: float, shards: int) -> int:
    """Move samples skipped in >= `threshold` of their round's visits to another shard, in place.

    Most-skipped samples move first, each to the other shard with the fewest samples (ties: lowest id),
    which spreads them over many proxies. A shard never drops below one sample. Returns the number moved."""
    if shards < 2:
        return 0
    sizes = torch.bincount(assignment, minlength=shards)
    candidates = torch.nonzero(skip_rate >= threshold).squeeze(1)
    candidates = candidates[torch.argsort(skip_rate[candidates], descending=True, stable=True)]
    moved = 0
    for index in candidates.tolist():
        source = int(assignment[index])
        if sizes[source] <= 1:
            continue
        others = sizes.clone()
        others[source] = torch.iinfo(others.dtype).max
        target = int(torch.argmin(others))
        assignment[index] = target
        sizes[source] -= 1
        sizes[target] += 1
        moved += 1
    return moved


class IETTrainer:
    """K proxy Trainers (the one training loop each) over shards, aggregated every round.

    Under several processes (`accelerate launch` / `torchrun`) each process trains the proxies of shards
    k with k % processes == rank, and the aggregation is an all-reduce of their weighted parameters.

    Presents the Trainer interface that run directories use: fit, step, last_log, ema, conditioner,
    noise_scheduler, ema_or_model, save_checkpoint, load_checkpoint. `step` counts proxy optimizer steps
    over all proxies; the run ends when as many samples have been seen as plain training would see in
    `train.max_steps` steps of `train.samples_per_step` samples.
    """

    def __init__(self, config: RunConfig, train_set: ImageSet, extra_hooks: Callable[[], list[TrainHook]] = list):
        iet = config.defense.iet_agc
        self.config = config
        self.iet = iet
        self.ratio = agc_ratio(config)
        self.assignment = split_shards(len(train_set), iet.shards, config.train.seed)
        self.ledger = SampleLedger(len(train_set))
        self.accelerator = make_accelerator(config.train.mixed_precision)
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        if iet.shards < processes:
            raise MemsafeError(
                f"defense.iet_agc.shards {iet.shards} is smaller than the number of processes ({processes}): "
                "every process trains at least one proxy"
            )
        self.owned = [k for k in range(iet.shards) if k % processes == rank]
        # The bank has one bin per timestep of the scheduler the proxies train with (a pretrained one may
        # differ from the config's default).
        timesteps = build_noise_scheduler(config.model).config.num_train_timesteps
        self.proxies: list[Trainer] = []
        for _ in self.owned:
            first = self.proxies[0] if self.proxies else None
            hooks = [AntiGradientControl(LossBank(timesteps, iet.bank_decay), self.ledger, self.ratio, skip=iet.agc)]
            if iet.augment:
                hooks.append(LossDrivenAugmentation(self.ledger, self.ratio, iet))
            self.proxies.append(
                Trainer(
                    config,
                    train_set,
                    hooks=hooks + list(extra_hooks()),
                    accelerator=self.accelerator,
                    unet=None if first is None else copy.deepcopy(first.unwrapped),
                    conditioner=None if first is None else first.conditioner,
                    data_parallel=False,
                )
            )
        self.round = 0
        self.step = 0
        self.samples_seen = 0
        self.last_log: dict[str, float] = {}

    # The Trainer interface used by run directories.
    @property
    def global_trainer(self) -> Trainer:
        """After aggregation every proxy holds the global weights; the first stands for the global model."""
        return self.proxies[0]

    @property
    def ema(self):
        return self.global_trainer.ema

    @property
    def conditioner(self):
        return self.global_trainer.conditioner

    @property
    def noise_scheduler(self):
        return self.global_trainer.noise_scheduler

    def ema_or_model(self, use_ema: bool) -> torch.nn.Module:
        return self.global_trainer.ema_or_model(use_ema)

    def shard_members(self, k: int) -> torch.Tensor:
        return torch.nonzero(self.assignment == k).squeeze(1)

    def round_steps(self, budget: int) -> list[int]:
        """Local steps of each proxy this round; the last round shares out the remaining samples by shard size."""
        batch = self.config.train.samples_per_step
        remaining = budget - self.samples_seen
        if remaining >= self.iet.shards * self.iet.local_steps * batch:
            return [self.iet.local_steps] * self.iet.shards
        sizes = torch.bincount(self.assignment, minlength=self.iet.shards).tolist()
        return [max(1, math.ceil(remaining * size / len(self.assignment) / batch)) for size in sizes]

    def train_proxy(self, k: int, proxy: Trainer, steps: int, bar: progress_bar) -> dict[str, float]:
        members = self.shard_members(k)
        proxy.use_subset(members, seed=(self.config.train.seed * 7919 + self.round) * 101 + k)
        losses = []
        for _ in range(steps):
            losses.append(proxy.train_step()["loss"])
            bar.update(self.accelerator.num_processes)  # the others train theirs meanwhile
        proxy.hooks.on_sync(proxy)  # before the proxies are averaged
        agc = proxy.hooks.hooks[0]
        return {"round": self.round, "shard": k, "loss": sum(losses) / len(losses),
                "skip_rate": agc.take_skip_rate(), "shard_size": len(members), **proxy.hooks.log_values()}

    def run_round(self, budget: int, bar: progress_bar, log: JsonLines) -> None:
        self.ledger.start_round()
        steps = self.round_steps(budget)
        rows = [self.train_proxy(k, proxy, steps[k], bar) for k, proxy in zip(self.owned, self.proxies)]
        if self.accelerator.num_processes > 1:
            rows = sorted(gather_object(rows), key=lambda row: row["shard"])
        for k, row in enumerate(rows):
            self.step += steps[k]
            self.samples_seen += steps[k] * self.config.train.samples_per_step
            log.write(self.step, row)
        self.last_log = rows[-1]
        bar.set_postfix(round=self.round, loss=f"{sum(r['loss'] for r in rows) / len(rows):.4f}",
                        skip=f"{sum(r['skip_rate'] for r in rows) / len(rows):.2f}")
        self.aggregate()
        self.ledger.end_round(self.accelerator)
        if self.iet.redistribute:
            self.last_log["moved"] = redistribute(
                self.assignment, self.ledger.round_skip_rate(), self.iet.redistribute_threshold, self.iet.shards
            )
        for proxy in self.proxies:
            proxy.hooks.on_round_end(proxy, self.round)
        self.round += 1

    def _weighted_sum(self, tensors_of: Callable[[Trainer], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Shard-size-weighted mean over all proxies of all processes, one tensor per position."""
        sizes = torch.bincount(self.assignment, minlength=self.iet.shards).double()
        weights = sizes / sizes.sum()
        total = None
        for k, proxy in zip(self.owned, self.proxies):
            flat = torch.cat([t.detach().double().flatten().cpu() for t in tensors_of(proxy)]) * weights[k]
            total = flat if total is None else total + flat
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total.to(self.accelerator.device), reduction="sum").cpu()
        shapes = [t.shape for t in tensors_of(self.proxies[0])]
        return [part.view(shape) for part, shape in zip(total.split([math.prod(s) for s in shapes]), shapes)]

    @torch.no_grad()
    def aggregate(self) -> None:
        """Global weights (and EMA weights) = shard-size-weighted mean of the proxies', loaded into all."""

        def floats(proxy: Trainer) -> list[torch.Tensor]:
            return [t for t in proxy.unwrapped.state_dict().values() if t.is_floating_point()]

        mean = self._weighted_sum(floats)
        for proxy in self.proxies:
            for tensor, value in zip(floats(proxy), mean):
                tensor.copy_(value)
        if self.ema is not None:
            mean = self._weighted_sum(lambda p: list(p.ema.shadow_params))
            for proxy in self.proxies:
                for tensor, value in zip(proxy.ema.shadow_params, mean):
                    tensor.copy_(value)

    def fit(self, max_steps=None, checkpoint_dir: Path | None = None, log_path: Path | None = None,
            progress: bool = True, on_checkpoint=None) -> dict[str, float]:
        train = self.config.train
        budget = (max_steps or train.max_steps) * train.samples_per_step
        estimate = self.step + math.ceil(max(budget - self.samples_seen, 0) / train.samples_per_step)
        started, first_step = time.perf_counter(), self.step
        last_checkpoint = self.step // train.checkpoint_every
        main = self.accelerator.is_main_process
        with run_display(estimate, self.step, "IET-AGC+ training", progress and main, log_path if main else None) as (
            bar,
            log,
        ):
            while self.samples_seen < budget:
                self.run_round(budget, bar, log)
                due = self.step // train.checkpoint_every > last_checkpoint or self.samples_seen >= budget
                if checkpoint_dir is not None and due:
                    last_checkpoint = self.step // train.checkpoint_every
                    path = self.save_checkpoint(checkpoint_dir)
                    if on_checkpoint:
                        on_checkpoint(path)
        steps_run = self.step - first_step
        elapsed = time.perf_counter() - started
        return {"steps": self.step, "rounds": self.round, "sec_per_step": elapsed / steps_run if steps_run else math.nan}

    def state_dict(self) -> dict:
        return {
            "assignment": self.assignment,
            "ledger": self.ledger.state_dict(),
            "round": self.round,
            "step": self.step,
            "samples_seen": self.samples_seen,
        }

    def save_checkpoint(self, root: Path) -> Path:
        """Every process writes its own proxies into the one checkpoint folder."""
        keep = self.config.train.checkpoints_total_limit
        with atomic_checkpoint(root, self.step, keep, self.accelerator, every_process_writes=True) as tmp:
            for k, proxy in zip(self.owned, self.proxies):
                write_trainer_state(proxy, tmp / f"proxy-{k:03d}")
            if self.accelerator.is_main_process:
                write_state(tmp / "iet", self.state_dict())
        return root / f"checkpoint-{self.step:08d}"

    def load_checkpoint(self, path: Path) -> None:
        if not (path / "iet.json").is_file():
            raise MemsafeError(f"checkpoint {path} was not written by an IET-AGC+ run (no iet.json)")
        state = read_state(path / "iet")
        if len(state["assignment"]) != len(self.assignment):
            raise MemsafeError(f"checkpoint {path} covers {len(state['assignment'])} images, the data has {len(self.assignment)}")
        for k, proxy in zip(self.owned, self.proxies):
            load_checkpoint(proxy, path / f"proxy-{k:03d}")
        self.assignment.copy_(state["assignment"])
        self.ledger.load_state_dict(state["ledger"])
        self.round, self.step, self.samples_seen = state["round"], state["step"], state["samples_seen"]
