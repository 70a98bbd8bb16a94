"""Anti-Gradient Control (reference code, exact): a per-timestep loss bank per proxy, and samples whose loss
falls below bank[t] / lambda skipped; the per-sample ledger that redistribution and augmentation read."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import torch

from memsafe.train.hooks import TrainHook, select_draws
from memsafe.train.loss import per_sample_diffusion_loss

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator


# The signals read with the caption's gain. caption_gain_loss multiplies the relative gain by the relative loss
# to this power: one draw's log loss spreads about 4.5x as wide as its log gain (0.44-0.57 against 0.10-0.20,
# bench/results/emoji_signal_budget2x.json), so each enters about by its spread. The loss adds what the gain
# cannot see: an image the model has learned to draw without its caption (half of all draws, on the emoji,
# are ten duplicated images) has a low loss both ways, and a gain near an ordinary image's.
CAPTION_SIGNALS = ("caption_gain", "caption_gain_loss")
LOSS_WEIGHT = 0.25
# The loss falls all through training; a bank per timestep, read every ~35 steps in the caption window, lagged
# so far behind it that every draw read low (75 % of all draws skipped at lambda 1.02). Ten timesteps a bin
# (of 1,000) are read ten times as often, and the loss changes little over ten timesteps.
LOSS_BANK_BINS = 100

STATE = ("skips", "visits", "round_skips", "round_visits", "relative_loss", "smoothed", "flagged", "streak")
LAST_READING = ("relative_loss", "smoothed", "flagged", "streak")  # per sample, as the process that visited it last left it


class SampleLedger:
    """Per-sample statistics over the whole training set (global indices), shared by all proxies."""

    def __init__(self, num_items: int, smoothing: float = 0.0):
        self.smoothing = smoothing
        self.skips = torch.zeros(num_items, dtype=torch.long)
        self.visits = torch.zeros(num_items, dtype=torch.long)
        self.round_skips = torch.zeros(num_items, dtype=torch.long)
        self.round_visits = torch.zeros(num_items, dtype=torch.long)
        self.relative_loss = torch.full((num_items,), math.inf)  # loss / bank[t] at the last visit
        # EMA over a sample's visits of its relative loss (`smoothing` the weight of the past; 0: the last visit)
        self.smoothed = torch.full((num_items,), math.inf)
        self.flagged = torch.zeros(num_items, dtype=torch.bool)  # skipped at its last reading (AGC's hysteresis)
        self.streak = torch.zeros(num_items, dtype=torch.long)  # its last readings in a row under bank / lambda

    def start_round(self) -> None:
        self.round_skips.zero_()
        self.round_visits.zero_()

    def smooth(self, index: torch.Tensor, relative: torch.Tensor) -> torch.Tensor:
        """Each sample's relative loss averaged over its visits, this one included (not yet stored). The
        first finite reading starts the average; a sample drawn twice in one batch counts its last draw."""
        past = self.smoothed[index].double()
        mixed = self.smoothing * past + (1 - self.smoothing) * relative.double()
        smoothed = torch.where(past.isfinite(), mixed, relative.double())
        return torch.where(relative.isnan(), past, smoothed)  # NaN: not measured this visit

    def record(self, index: torch.Tensor, kept: torch.Tensor, relative: torch.Tensor,
               below: torch.Tensor | None = None, streak_keys: torch.Tensor | None = None) -> None:
        """One visit per draw; `below`: which readings fell under bank / lambda (the latch's streak), counted on
        `streak_keys` (default: each draw's own sample; a negative key counts nowhere)."""
        self.round_visits.index_add_(0, index, torch.ones_like(index))
        self.round_skips.index_add_(0, index, (~kept).long())
        measured = ~relative.isnan()  # only readings are stored: a sample drawn twice keeps a reading over none
        self.smoothed[index[measured]] = self.smooth(index, relative)[measured].float()
        self.relative_loss[index[measured]] = relative[measured].float()
        self.flagged[index[measured]] = ~kept[measured]
        below = ~kept if below is None else below
        if streak_keys is None:
            self.streak[index[measured]] = torch.where(below, self.streak[index] + 1, 0)[measured]
            return
        for key, low in zip(streak_keys[measured].tolist(), below[measured].tolist()):  # in draw order: keys repeat
            if key >= 0:
                self.streak[key] = self.streak[key] + 1 if low else 0

    def end_round(self, accelerator: Accelerator | None = None) -> None:
        """Adds the round to the totals. Each process saw only its proxies' shards: the round counts are
        summed over processes and every sample's last relative loss comes from the process that visited it."""
        if accelerator is not None and accelerator.num_processes > 1:
            visited = self.round_visits > 0
            counts = accelerator.reduce(torch.stack([self.round_visits, self.round_skips]), reduction="sum")
            for key in LAST_READING:
                value = getattr(self, key)
                summed = accelerator.reduce(torch.where(visited, value.double(), 0.0), reduction="sum")
                setattr(self, key, torch.where(counts[0] > 0, summed.to(value.dtype), value))
            self.round_visits.copy_(counts[0])
            self.round_skips.copy_(counts[1])
        self.visits += self.round_visits
        self.skips += self.round_skips

    def round_skip_rate(self) -> torch.Tensor:
        return self.round_skips.double() / self.round_visits.clamp_min(1).double()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in STATE}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():  # a checkpoint from before `smoothed` or `flagged` leaves it unset
            getattr(self, key).copy_(value)


def duplicated_caption_groups(captions: list[str]) -> torch.Tensor:
    """Each sample's latch key under `agc_latch_by: caption`: the first sample with its caption where several
    samples carry that caption, else -1 (a caption of its own, or none, never latches)."""
    counts = Counter(captions)
    first: dict[str, int] = {}
    keys = [first.setdefault(text, i) if text and counts[text] > 1 else -1 for i, text in enumerate(captions)]
    return torch.tensor(keys, dtype=torch.long)


def latch_groups(latch_by: str, captions: list[str] | None) -> torch.Tensor | None:
    """The latch's streak keys for `defense.iet_agc.agc_latch_by`: None by sample, caption groups by caption."""
    return duplicated_caption_groups(captions) if latch_by == "caption" else None


def latched(streak: torch.Tensor, latch: int, index: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Which of the samples `index` a latch of `latch` readings holds, from the ledger's streaks (counted on each
    sample's `groups` key where given: see duplicated_caption_groups)."""
    if groups is None:
        return streak[index] >= latch
    keys = groups[index]
    return (keys >= 0) & (streak[keys.clamp_min(0)] >= latch)


class LossBank:
    """Running loss per timestep (or bin of them) of one proxy, as in the reference: starts at 0, EMA with `decay`."""

    def __init__(self, num_timesteps: int, decay: float, start_at_first: bool = False, geometric: bool = False,
                 bins: int | None = None):
        # One bin per timestep (the reference), or `bins` equal bins of them: a bin read more often lags less
        # behind a signal that falls all through training, as the loss does.
        self.num_timesteps = num_timesteps
        self.values = torch.zeros(bins or num_timesteps, dtype=torch.float64)
        self.decay = decay
        # The reference starts every timestep at 0, so a sample is never skipped until the bank has filled. A
        # signal near 1 (the caption gain) would read 1/0.2 after one visit and take ~30 visits of each t to
        # settle: such a bank starts at its first reading instead.
        self.start_at_first = start_at_first
        # An EMA of the log readings (a running geometric mean): one draw's loss is skewed (log spread 0.45), so
        # its running mean sits above the typical draw, and a rule against it would skip most ordinary draws.
        self.geometric = geometric

    def bin(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps * len(self.values) // self.num_timesteps

    def relative(self, losses: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        bank = self.values[self.bin(timesteps)]
        relative = torch.where(bank > 0, losses.double() / bank.clamp_min(1e-30), torch.full_like(bank, math.inf))
        return torch.where(losses.isnan(), math.nan, relative)

    def update(self, losses: torch.Tensor, timesteps: torch.Tensor) -> None:
        # Sequential, as the reference: two samples with the same t both enter the average.
        for t, loss in zip(self.bin(timesteps).tolist(), losses.double().tolist()):
            if math.isnan(loss):
                continue
            if self.start_at_first and self.values[t] == 0:
                self.values[t] = loss
            elif self.geometric:
                self.values[t] = self.values[t] ** self.decay * max(loss, 1e-30) ** (1 - self.decay)
            else:
                self.values[t] = self.decay * self.values[t] + (1 - self.decay) * loss


class AntiGradientControl(TrainHook):
    """Skips a sample when its relative loss (loss / bank[t], averaged over its visits when the ledger
    smooths) times lambda is below 1; with `skip=False` it only keeps the statistics.

    A draw AGC does not read (its timestep outside `timesteps`, or, for the caption gain, its caption dropped)
    is judged on its sample's earlier reading; when that skips it, it leaves the batch before the forward pass.
    With `read_share` < 1 only that share of the draws it could read, chosen at random, is read; the rest are
    judged the same way, so a sample whose last reading skipped it mostly costs nothing until it is read again.

    With `release` set, the rule has hysteresis: a sample its last reading skipped stays skipped until a reading
    is back at `release` times the bank (1.0: the bank's running mean), not merely above bank / lambda. A
    duplicate held just under the threshold otherwise passes on every reading that noise or drift lifts over it,
    trains, and falls back: the longer the run, the more of it is learned.

    With `latch` set, a sample whose last `latch` readings in a row were all under bank / lambda is held for the
    rest of the run: its later draws leave the batch before the forward pass, unread. Every rule that judges
    draws one by one passes a share of a memorized sample's draws, and that share trains it more the longer the
    run; a latched sample stops costing copies (or compute) however long the run goes on.

    With `latch_groups` (one key per sample: the first sample with its caption, -1 for a sample that may not
    latch) the samples of one key share one streak, counted in draw order: a caption carried by many copies is
    read as often as they are drawn, and latches them all at once.

    With `per_draw=False` (a latch set) no draw is skipped on its own reading: readings only count toward the latch,
    and a sample leaves only once latched. The per-draw rule also skips the low tail of every unique image's draws
    (14-18 % of them on the emoji), which costs quality a latch alone does not.

    With `bank_share` < 1 (latch groups, per_draw=False) a draw whose caption can no longer latch is read only
    with that probability, for the bank: its reading could change nothing else. A draw that can latch is always
    read for its streak, but enters the bank with the same probability, so the bank stays a fair sample. Once every
    caption that can latch has latched, no draw is read at all: the bank has no reader left (unless `ledger_read`,
    where something else, e.g. the loss-driven augmentation, reads the ledger's readings)."""

    name = "agc"

    def __init__(self, bank: LossBank, ledger: SampleLedger, ratio: float, skip: bool = True, signal: str = "loss",
                 timesteps: tuple[int, int] | None = None, read_share: float = 1.0, seed: int = 0,
                 release: float | None = None, latch: int | None = None, latch_groups: torch.Tensor | None = None,
                 per_draw: bool = True, bank_share: float = 1.0, ledger_read: bool = False):
        self.bank, self.ledger, self.ratio, self.skip = bank, ledger, ratio, skip
        self.bank_share, self.ledger_read = bank_share, ledger_read
        self.release, self.latch, self.latch_groups, self.per_draw = release, latch, latch_groups, per_draw
        # each caption group's key (its first sample, where the group's streak is kept)
        self.group_keys = None if latch_groups is None else latch_groups[latch_groups >= 0].unique()
        # caption_gain_loss: the loss's own bank (geometric, binned), beside the gain's
        self.loss_bank = None
        if signal == "caption_gain_loss":
            self.loss_bank = LossBank(bank.num_timesteps, bank.decay, start_at_first=True, geometric=True,
                                      bins=min(LOSS_BANK_BINS, len(bank.values)))
        self.signal = signal
        self.timesteps = timesteps
        self.read_share = read_share
        self.generator = torch.Generator().manual_seed(seed)  # which draws are read; saved with checkpoints
        self.kept = 0
        self.seen = 0

    def reads(self, batch) -> torch.Tensor:
        """Which draws of the batch give AGC a reading: as on_batch_start chose them, else all it can read."""
        return batch["agc_read"].cpu() if "agc_read" in batch else self.readable(batch)

    def readable(self, batch) -> torch.Tensor:
        """The draws AGC can read: its timesteps, and (caption gain) a caption that was not dropped."""
        timesteps = batch["timesteps"].cpu()
        read = torch.ones_like(timesteps, dtype=torch.bool)
        if self.timesteps is not None:
            low, high = self.timesteps
            read &= (timesteps >= low) & (timesteps < high)
        if self.signal in CAPTION_SIGNALS:  # the gain is 1 by construction where the caption was dropped
            read &= ~batch["caption_dropped"].cpu()  # the loop's record: a hook may change the states themselves
        return read

    def on_batch_start(self, batch, trainer):
        index = batch["index"].cpu()
        read = self.readable(batch)
        if self.read_share < 1.0:  # a share of the readable draws, at random
            read &= torch.rand(len(read), generator=self.generator) < self.read_share
        if self.bank_share < 1.0 and self.nothing_left_to_latch():
            read = torch.zeros_like(read)
            batch = batch | {"agc_read": read, "agc_bank": read}
        elif self.bank_share < 1.0:
            banked = read & (torch.rand(len(read), generator=self.generator) < self.bank_share)
            batch = batch | {"agc_read": banked | (read & self.can_latch(index)), "agc_bank": banked}
        else:
            batch = batch | {"agc_read": read}
        if not self.skip:
            return batch
        decided = (~read & self.skips(self.ledger.smoothed[index], index)) | self.latched(index)
        decided[0] = decided[0] & ~decided.all()  # one draw stays: every process runs a backward pass
        if not decided.any():
            return batch
        count = int(decided.sum())
        self.ledger.record(index[decided], torch.zeros(count, dtype=torch.bool), torch.full((count,), math.nan))
        self.seen += count
        return select_draws(batch, ~decided)

    def on_losses(self, losses, batch, trainer):
        read = self.reads(batch)
        timesteps, index = batch["timesteps"].cpu(), batch["index"].cpu()
        values = caption_gain(losses, batch, trainer, read) if self.signal in CAPTION_SIGNALS else losses
        values = torch.where(read, values.cpu(), math.nan)
        relative = self.bank.relative(values, timesteps)
        banked = batch["agc_bank"].cpu() if "agc_bank" in batch else read
        if self.loss_bank is not None:
            losses = torch.where(read, losses.detach().cpu(), math.nan)
            relative = relative * self.loss_bank.relative(losses, timesteps) ** LOSS_WEIGHT
            self.loss_bank.update(torch.where(banked, losses, math.nan), timesteps)
        score = self.ledger.smooth(index, relative)
        kept = torch.ones_like(values, dtype=torch.bool)
        if self.skip:  # a latched draw is here only as the one kept for the backward pass: it does not train
            kept = ~self.skips(score, index) & ~self.latched(index)
        self.bank.update(torch.where(banked, values, math.nan), timesteps)
        self.ledger.record(index, kept, relative, below=self.below(score), streak_keys=self.streak_keys(index))
        self.kept += int(kept.sum())
        self.seen += len(kept)
        return kept.float() if self.skip else None

    def skips(self, score: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The rule: which draws (of the samples `index`) a score (relative loss or gain) skips on its own."""
        if not self.per_draw:
            return torch.zeros_like(score, dtype=torch.bool)
        if self.release is None:
            return self.below(score)
        return torch.where(self.ledger.flagged[index], score < self.release, self.below(score))

    def below(self, score: torch.Tensor) -> torch.Tensor:
        """Under bank / lambda: the reference's rule, and what a latch's streak counts."""
        return score * self.ratio < 1.0

    def streak_keys(self, index: torch.Tensor) -> torch.Tensor | None:
        """Where each sample's latch streak is counted: its own (None), or its group's key."""
        return None if self.latch_groups is None else self.latch_groups[index]

    def can_latch(self, index: torch.Tensor) -> torch.Tensor:
        """Which of the samples `index` a reading could still latch: a shared caption, not latched yet."""
        return (self.latch_groups[index] >= 0) & ~self.latched(index)

    def nothing_left_to_latch(self) -> bool:
        """Every caption group has latched, and nothing but the bank would use a reading (see the class)."""
        if self.latch is None or self.group_keys is None or self.per_draw or self.ledger_read:
            return False
        return not self.can_latch(self.group_keys).any()

    def latched(self, index: torch.Tensor) -> torch.Tensor:
        if self.latch is None:
            return torch.zeros_like(index, dtype=torch.bool)
        return latched(self.ledger.streak, self.latch, index, self.latch_groups)

    def take_skip_rate(self) -> float:
        rate = 1.0 - self.kept / self.seen if self.seen else 0.0
        self.kept = self.seen = 0
        return rate

    def state_dict(self):
        state = {"bank": self.bank.values, "read_generator": self.generator.get_state()}
        return state | ({"loss_bank": self.loss_bank.values} if self.loss_bank is not None else {})

    def load_state_dict(self, state):
        if "bank" in state:
            self.bank.values.copy_(state["bank"])
        if "loss_bank" in state and self.loss_bank is not None:
            self.loss_bank.values.copy_(state["loss_bank"])
        if "read_generator" in state:
            self.generator.set_state(state["read_generator"])


@torch.no_grad()
def caption_gain(losses: torch.Tensor, batch: dict, trainer, read: torch.Tensor) -> torch.Tensor:
    """Each read draw's loss over its loss at the same noisy input with the empty caption (one more forward
    pass, no gradient, over the read draws only): how much the caption helps. A duplicated image's caption
    comes to pin the image down, so its gain falls well below an ordinary image's long before its loss does
    (bench/emoji_signals.py). NaN for the draws not read."""
    gain = torch.full_like(losses, math.nan)
    rows = read.to(losses.device)
    if not rows.any():
        return gain
    states = batch["model_kwargs"]["encoder_hidden_states"][rows]
    empty = trainer.conditioner.empty.to(states).expand_as(states)
    with trainer.accelerator.autocast():
        unconditional, _ = per_sample_diffusion_loss(
            trainer.unet, trainer.noise_scheduler, batch["pixels"][rows], batch["noise"][rows],
            batch["timesteps"][rows], snr_gamma=trainer.config.train.snr_gamma, encoder_hidden_states=empty,
        )
    gain[rows] = losses[rows] / unconditional.clamp_min(1e-12)
    return gain
