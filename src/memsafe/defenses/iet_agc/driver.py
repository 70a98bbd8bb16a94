"""IET's driver: K proxy Trainers (the one training loop each) over shards, aggregated every round."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import gather_object

from memsafe.config import RunConfig
from memsafe.data.images import ImageSet
from memsafe.defenses.contract import HookMaker
from memsafe.defenses.iet_agc.agc import AntiGradientControl, LossBank, SampleLedger, latch_groups
from memsafe.defenses.iet_agc.augment import LossDrivenAugmentation
from memsafe.defenses.iet_agc.config import agc_ratio, schedule, small_shard_warning
from memsafe.defenses.iet_agc.shards import redistribute, split_shards
from memsafe.errors import MemsafeError
from memsafe.models.unet import training_timesteps
from memsafe.train.checkpoint import atomic_checkpoint, load_checkpoint, read_state, write_state, write_trainer_state
from memsafe.train.loop import Trainer, drive, make_accelerator


class AdapterSlots:
    """LoRA proxies over one frozen base: a single UNet whose trainable (adapter) weights hold one proxy's
    values at a time, the other proxies' values waiting here. Each proxy keeps its own optimizer, EMA and
    hooks over the shared weights."""

    def __init__(self, model: torch.nn.Module, count: int):
        self.live = [p for p in model.parameters() if p.requires_grad]
        self.saved = [[p.detach().clone() for p in self.live] for _ in range(count)]
        self.active = 0

    @torch.no_grad()
    def activate(self, index: int) -> None:
        """Puts proxy `index`'s adapter into the model, keeping the one that was there."""
        if index == self.active:
            return
        for saved, live in zip(self.saved[self.active], self.live):
            saved.copy_(live)
        for saved, live in zip(self.saved[index], self.live):
            live.copy_(saved)
        self.active = index

    def weights(self, index: int) -> list[torch.Tensor]:
        """Proxy `index`'s adapter weights, wherever they are now."""
        return self.live if index == self.active else self.saved[index]


class OuterStep:
    """The round's update as DiLoCo's outer optimizer makes it (Douillard et al., 2023): the change of the
    averaged proxies from the round's start is a pseudo-gradient, stepped by Nesterov momentum SGD."""

    def __init__(self, start: list[torch.Tensor], learning_rate: float, momentum: float):
        self.anchor = [t.detach().float().clone() for t in start]  # the global weights at the round's start
        self.velocity = [torch.zeros_like(t) for t in self.anchor]
        self.learning_rate, self.momentum = learning_rate, momentum

    @torch.no_grad()
    def step(self, mean: list[torch.Tensor]) -> list[torch.Tensor]:
        """The next global weights from the proxies' mean."""
        for anchor, velocity, average in zip(self.anchor, self.velocity, mean):
            gradient = anchor - average.float()
            velocity.mul_(self.momentum).add_(gradient)
            anchor.sub_(self.learning_rate * (gradient + self.momentum * velocity))
        return self.anchor


class IETTrainer:
    """K proxy Trainers over shards, aggregated every round (train.protocol.TrainerLike).

    Under several processes (`accelerate launch` / `torchrun`) each process trains the proxies of shards
    k with k % processes == rank, and the aggregation is an all-reduce of their weighted parameters.

    `step` counts optimizer steps over all proxies: a run of `train.max_steps` steps sees as many samples as
    plain training does in as many steps. Each round every proxy takes `local_steps` (the schedule of
    config.py); the last round shares out the steps left by shard size.

    Under LoRA the proxies are K adapters over one frozen base (AdapterSlots); otherwise each proxy is a
    copy of the model.
    """

    def __init__(self, config: RunConfig, train_set: ImageSet, extra_hooks: HookMaker = list):
        iet = config.defense.iet_agc
        self.assignment = split_shards(len(train_set), iet.shards, config.train.seed)
        self.config = config
        self.iet = iet
        self.local_steps = schedule(iet, config.train.max_steps).local_steps
        self.ratio = agc_ratio(config)
        self.ledger = SampleLedger(len(train_set), iet.agc_smoothing)
        self.accelerator = make_accelerator(config.train.mixed_precision)
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        if iet.shards < processes:
            raise MemsafeError(
                f"defense.iet_agc.shards {iet.shards} is smaller than the number of processes ({processes}): "
                "every process trains at least one proxy"
            )
        if iet.agc_latch_by == "caption" and processes > 1:
            raise MemsafeError(
                "defense.iet_agc.agc_latch_by caption runs in one process for now (a caption's copies fall in "
                f"several processes' shards, and their shared streak is not merged): run it without the {processes} "
                "processes, or use agc_latch_by: sample"
            )
        groups = latch_groups(iet.agc_latch_by, train_set.captions)
        self.owned = [k for k in range(iet.shards) if k % processes == rank]
        warning = small_shard_warning(iet, len(train_set), config.train.batch_size)
        if warning and self.accelerator.is_main_process:
            print(f"memsafe: warning: {warning}", file=sys.stderr)
        # The bank has one bin per timestep of the scheduler the proxies train with.
        timesteps = training_timesteps(config.model)
        self.proxies: list[Trainer] = []
        self.agc: list[AntiGradientControl] = []
        shared_base = bool(config.model.lora_rank)
        for shard in self.owned:
            first = self.proxies[0] if self.proxies else None
            unet = None
            if first is not None:
                unet = first.unwrapped if shared_base else copy.deepcopy(first.unwrapped)
            bank = LossBank(timesteps, iet.bank_decay, start_at_first=iet.agc_signal != "loss", bins=iet.bank_bins)
            agc = AntiGradientControl(bank, self.ledger, self.ratio, skip=iet.agc, signal=iet.agc_signal,
                                      timesteps=iet.agc_timesteps, read_share=iet.agc_read_share,
                                      seed=config.train.seed * 1000 + shard, release=iet.agc_release,
                                      latch=iet.agc_latch, latch_groups=groups, per_draw=iet.agc_per_draw,
                                      bank_share=iet.agc_bank_share, ledger_read=iet.augment)
            hooks = [agc, LossDrivenAugmentation(self.ledger, self.ratio, iet)] if iet.augment else [agc]
            self.agc.append(agc)
            self.proxies.append(
                Trainer(
                    config,
                    train_set,
                    hooks=hooks + list(extra_hooks()),
                    accelerator=self.accelerator,
                    unet=unet,
                    conditioner=None if first is None else first.conditioner,
                    data_parallel=False,
                    inputs=None if first is None else first.pixels,
                )
            )
        for proxy in self.proxies:
            if proxy.ema is not None:  # a proxy steps once per K global steps: the same horizon in samples seen
                proxy.ema.decay = config.train.ema_decay ** iet.shards
        self.slots = AdapterSlots(self.proxies[0].unwrapped, len(self.proxies)) if shared_base else None
        self.outer = None
        if iet.outer_learning_rate != 1.0 or iet.outer_momentum:
            self.outer = OuterStep(self.weights(0), iet.outer_learning_rate, iet.outer_momentum)
        self.round = 0
        self.step = 0
        self.last_log: dict[str, float] = {}

    @property
    def samples_seen(self) -> int:
        return self.step * self.config.train.samples_per_step

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

    def training_members(self, index: int) -> torch.Tensor:
        """The samples proxy `index` draws from this round: its shard, less the latched samples where they leave it
        (`agc_latch_leaves: shard`; one sample stays, so the proxy still has batches)."""
        members = self.shard_members(self.owned[index])
        if self.iet.agc_latch_leaves != "shard" or not self.iet.agc:  # agc: false keeps statistics, skips nothing
            return members
        held = self.agc[index].latched(members)
        return members[~held] if not held.all() else members[:1]

    def round_steps(self, max_steps: int) -> list[int]:
        """Local steps of each proxy this round; the last round shares out the remaining steps by shard size."""
        remaining = max_steps - self.step
        if remaining >= self.iet.shards * self.local_steps:
            return [self.local_steps] * self.iet.shards
        sizes = torch.bincount(self.assignment, minlength=self.iet.shards).tolist()
        return [max(1, math.ceil(remaining * size / len(self.assignment))) for size in sizes]

    def train_proxy(self, index: int, steps: int, bar) -> dict[str, float]:
        k, proxy = self.owned[index], self.proxies[index]
        self.activate(index)
        members = self.training_members(index)
        proxy.use_subset(members, seed=(self.config.train.seed * 7919 + self.round) * 101 + k)
        losses = []
        for _ in range(steps):
            losses.append(proxy.train_step()["loss"])
            bar.update(self.accelerator.num_processes)  # the others train theirs meanwhile
        proxy.hooks.on_sync(proxy)  # before the proxies are averaged
        return {"round": self.round, "shard": k, "loss": sum(losses) / len(losses),
                "skip_rate": self.agc[index].take_skip_rate(), "shard_size": len(members), **proxy.hooks.log_values()}

    def run_round(self, max_steps: int, bar, log) -> None:
        """One round: every proxy trains on its shard, then the proxies are averaged. `drive`'s unit of work."""
        self.ledger.start_round()
        steps = self.round_steps(max_steps)
        rows = [self.train_proxy(i, steps[k], bar) for i, k in enumerate(self.owned)]
        if self.accelerator.num_processes > 1:
            rows = sorted(gather_object(rows), key=lambda row: row["shard"])
        for k, row in enumerate(rows):
            self.step += steps[k]
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

    def activate(self, index: int) -> None:
        """Makes the model hold proxy `index`'s weights (a no-op when every proxy has a model of its own)."""
        if self.slots is not None:
            self.slots.activate(index)

    def weights(self, index: int) -> list[torch.Tensor]:
        """The floating-point weights of proxy `index` that training changes."""
        if self.slots is not None:
            return self.slots.weights(index)
        return [t for t in self.proxies[index].unwrapped.state_dict().values() if t.is_floating_point()]

    def _weighted_sum(self, tensors_of: Callable[[int], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Shard-size-weighted mean over all proxies of all processes, one tensor per position."""
        sizes = torch.bincount(self.assignment, minlength=self.iet.shards).double()
        weights = sizes / sizes.sum()
        total = None
        for index, k in enumerate(self.owned):
            flat = torch.cat([t.detach().double().flatten().cpu() for t in tensors_of(index)]) * weights[k]
            total = flat if total is None else total + flat
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total.to(self.accelerator.device), reduction="sum").cpu()
        shapes = [t.shape for t in tensors_of(0)]
        return [part.view(shape) for part, shape in zip(total.split([math.prod(s) for s in shapes]), shapes)]

    @property
    def sole_proxy(self) -> bool:
        """One proxy in one process, stepped by plain averaging: its weights are already the mean."""
        return self.iet.shards == 1 and self.accelerator.num_processes == 1 and self.outer is None

    @torch.no_grad()
    def aggregate(self) -> None:
        """Global weights (and EMA weights) = shard-size-weighted mean of the proxies', loaded into all."""
        if self.sole_proxy:  # the mean of one proxy (weight 1.0, through float64) is its own weights, bit for bit
            return
        mean = self._weighted_sum(self.weights)
        if self.outer is not None:
            mean = self.outer.step(mean)
        for index in range(len(self.proxies)):
            for tensor, value in zip(self.weights(index), mean):
                tensor.copy_(value)
        if self.ema is not None:
            mean = self._weighted_sum(lambda index: list(self.proxies[index].ema.shadow_params))
            for proxy in self.proxies:
                for tensor, value in zip(proxy.ema.shadow_params, mean):
                    tensor.copy_(value)

    def fit(self, max_steps=None, checkpoint_dir: Path | None = None, log_path: Path | None = None,
            progress: bool = True, on_checkpoint=None) -> dict[str, float]:
        stats = drive(self, self.run_round, "IET-AGC+ training", max_steps, checkpoint_dir, log_path, progress,
                      on_checkpoint)
        return stats | {"rounds": self.round}

    def state_dict(self) -> dict:
        return {
            "assignment": self.assignment,
            "ledger": self.ledger.state_dict(),
            "round": self.round,
            "step": self.step,
            "samples_seen": self.samples_seen,
        } | ({} if self.outer is None else {"outer_velocity": {str(i): v for i, v in enumerate(self.outer.velocity)}})

    def save_checkpoint(self, root: Path) -> Path:
        """Every process writes its own proxies into the one checkpoint folder."""
        keep = self.config.train.checkpoints_total_limit
        with atomic_checkpoint(root, self.step, keep, self.accelerator, every_process_writes=True) as tmp:
            for index, (k, proxy) in enumerate(zip(self.owned, self.proxies)):
                self.activate(index)
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
        for index, (k, proxy) in enumerate(zip(self.owned, self.proxies)):
            self.activate(index)
            load_checkpoint(proxy, path / f"proxy-{k:03d}")
        self.assignment.copy_(state["assignment"])
        self.ledger.load_state_dict(state["ledger"])
        self.round, self.step = state["round"], state["step"]
        if self.outer is not None:  # checkpoints are written between rounds: the global weights are the anchor
            outer = self.outer
            for i, (anchor, velocity, weight) in enumerate(zip(outer.anchor, outer.velocity, self.weights(0))):
                anchor.copy_(weight)
                velocity.copy_(state["outer_velocity"][str(i)])
