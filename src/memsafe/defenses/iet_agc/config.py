"""IET-AGC+ settings (`defense.iet_agc`) and the round schedule they give for a step budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from memsafe.errors import MemsafeError

if TYPE_CHECKING:  # pragma: no cover
    from memsafe.config import RunConfig

DEFAULT_ROUNDS = 10  # the reference code's total_round on CIFAR-10
# Averaging proxies that trained apart from a random start for most of the run gives noise: one round of
# ten shards returned pure noise (domain FID 100x plain) that still read "0 % memorized".
MIN_ROUNDS = 5

# Named starting points: a profile fills the keys a config leaves unset, a key set in the config wins. "auto"
# is "caption" for a text-conditional model and "loss" otherwise. "loss" is the rule the digits benchmark
# supports, "caption" the one the emoji benchmark supports (judged by the caption's gain at mid noise, on one
# shard: at that budget proxy averaging cost +35 % FID; docs/research/iet-agc.md), "reference" the public
# reference code's rule (AGC on one draw of the loss). A profile's agc_timesteps are of 1,000 training timesteps,
# scaled to the run's scheduler.
PROFILES = {
    "loss": {"shards": 4, "agc_signal": "loss", "agc_smoothing": 0.8},
    "caption": {"shards": 1, "agc_signal": "caption_gain", "agc_ratio": 1.02, "agc_smoothing": 0.0,
                "agc_timesteps": [200, 500]},
    "reference": {"shards": 4, "agc_signal": "loss", "agc_smoothing": 0.0},
}


@dataclass
class IETConfig:
    """IET-AGC+ (sample-level defense); every component can be switched off for ablation. The keys left None
    are filled by `profile` when the run config is checked (`resolve_profile`)."""

    profile: str = "auto"  # auto, loss, caption or reference (PROFILES)
    shards: int | None = None  # K proxies
    # The schedule: set at most one of rounds and local_steps; the other follows from train.max_steps (the
    # optimizer steps of all proxies together). Neither set: 10 rounds.
    rounds: int | None = None
    local_steps: int | None = None  # optimizer steps per proxy per round
    agc: bool = True  # skip samples with loss < bank[t] / agc_ratio
    # The AGC ratio (lambda in the IET-AGC paper); left None by the loss rules: 2.0 from scratch, 1.25 when
    # fine-tuning (the reference code's)
    agc_ratio: float | None = None
    bank_decay: float = 0.8  # EMA of the per-timestep loss bank
    # The bank's bins over the training timesteps (None: one per timestep, the reference's). A bin holds about
    # (1 + decay) / (1 - decay) recent draws of whatever images came, so at 0.8 it sways with whether they were
    # duplicates; fewer, wider bins are read often enough for a slower decay without lagging behind training.
    bank_bins: int | None = None
    # What AGC compares with its per-timestep bank: "loss" (the reference code), or "caption_gain", the loss
    # over the same draw's loss with the empty caption (text-conditional models; one more forward pass, no
    # gradient, per batch). The gain sits near 1, so its lambda sits near 1 too (1.02-1.05; lower is stricter).
    # "caption_gain_loss": the relative gain times the relative loss to the power 0.25 (agc.LOSS_WEIGHT), each
    # over its own bank (the loss's a running geometric mean): the loss also catches an image learned without
    # its caption, which the gain cannot see.
    agc_signal: str | None = None
    # [low, high): the timesteps at which AGC reads its signal (None after the profile: all; [0, 1000] says
    # all under the caption profile). A draw elsewhere is judged on its
    # sample's earlier reading and, when that skips it, leaves the batch before the forward pass. The caption
    # gain separates the duplicates at mid noise and reads about 1 for every image elsewhere; reading it at
    # fewer timesteps also saves its extra forward pass there.
    agc_timesteps: list[int] | None = None
    # The share of the draws in agc_timesteps that AGC reads, chosen at random; the others are judged like the
    # draws outside. Below 1 the caption gain's extra pass runs on fewer draws, and a sample whose last reading
    # skipped it leaves its next batches before their forward pass until it is read again.
    agc_read_share: float = 1.0
    # Skip (and augment) on a sample's relative loss averaged over its visits, this weight on the past. 0 is
    # the reference code's single draw, which cost +74 % FID on the digits where 0.8 gained 31 %
    # (docs/research/iet-agc.md); the caption gain is read on single draws.
    agc_smoothing: float | None = None
    # Hysteresis: a sample AGC skipped stays skipped until a reading of it is back at this multiple of the bank
    # (1.0: the bank's running mean; at least 1 / agc_ratio). None: each reading is judged against bank / lambda
    # alone, the reference's rule, under which the caption profile's hold-back eroded at twice the emoji budget.
    agc_release: float | None = None
    # Latch: a sample whose readings fell under bank / lambda this many times in a row is held for the rest of
    # the run (its draws leave before the forward pass, unread). None: never. Every per-draw rule passes a share
    # of a memorized sample's draws, and that share trains it more the longer the run.
    agc_latch: int | None = None
    # What a latch's streak counts: "sample" (each sample its own readings) or "caption": the samples that share
    # a caption share one streak, and a caption that one sample alone carries never latches (its draws keep the
    # per-draw rule). The gain reads as low for an image its caption alone pins down (a flag) as for a copy; a
    # caption many samples carry is read as often as they are drawn. Copies under different captions are not
    # latched this way.
    agc_latch_by: str = "sample"
    # False (with agc_latch set): AGC skips no draw on its own reading; readings only count toward the latch, and a
    # sample leaves only once latched. The per-draw rule also skips the low tail of every unique image's draws.
    agc_per_draw: bool = True
    # Where a latched sample goes: "batch" (its draws leave each batch before the forward pass: smaller batches, less
    # compute) or "shard" (it also leaves its shard at the next round, so the batches fill with the other samples,
    # as on deduplicated data: full compute, the unique samples drawn as often as deduplication would draw them).
    agc_latch_leaves: str = "batch"
    # Under agc_latch_by: caption with agc_per_draw: false a draw whose caption can no longer latch (one of its own,
    # or latched already) only feeds the bank: below 1, such draws are read with this probability, and the draws
    # that can latch enter the bank with it too (so the bank stays a fair sample of the draws it reads), but are
    # always read for their streak. The caption gain's extra pass then runs mostly on the draws that can latch,
    # and not at all once every caption that can latch has (with augment off: nothing else reads the readings).
    agc_bank_share: float = 1.0
    # The outer step (DiLoCo's outer Nesterov optimizer): the round's averaged change is a pseudo-gradient
    # stepped with this learning rate and momentum. 1.0 and 0.0: the global model is the proxies' plain mean.
    outer_learning_rate: float = 1.0
    outer_momentum: float = 0.0
    redistribute: bool = True  # AGC+: move persistently skipped samples to other shards between rounds
    redistribute_threshold: float = 0.5  # share of a sample's visits in a round that were skipped
    augment: bool = True  # AGC+: augmentation strength grows as a sample's loss falls
    augment_flip: bool = False  # horizontal flips (off for digits and text, whose meaning a flip changes)
    # Full-strength translation (fraction of the image) and brightness/contrast change. Kept small: on the
    # demo digits a 2-pixel shift doubled FID, sub-pixel shifts did not (docs/research/iet-agc.md).
    augment_max_shift: float = 0.03
    augment_max_jitter: float = 0.05
    PROFILES: ClassVar[dict[str, dict]] = PROFILES


def agc_ratio(config: RunConfig) -> float:
    """lambda: the configured value, else the reference code's 2.0 from scratch and 1.25 for fine-tuning."""
    ratio = config.defense.iet_agc.agc_ratio
    return ratio if ratio is not None else (1.25 if config.model.pretrained else 2.0)


def resolve_profile(iet: IETConfig, text_conditional: bool, num_timesteps: int = 1000) -> None:
    """Fills the keys `iet` leaves unset from its profile ("auto" becomes the one it picks for the model), the
    profile's timestep window scaled from 1,000 to the scheduler's `num_timesteps`."""
    if iet.profile == "auto":
        iet.profile = "caption" if text_conditional else "loss"
    if iet.profile not in PROFILES:
        raise MemsafeError(f"defense.iet_agc.profile must be auto or one of {', '.join(PROFILES)}, got {iet.profile!r}")
    for key, value in PROFILES[iet.profile].items():
        if getattr(iet, key) is None:
            if key == "agc_timesteps":
                value = [round(t * num_timesteps / 1000) for t in value]
            setattr(iet, key, value)


@dataclass(frozen=True)
class Schedule:
    rounds: int  # rounds in the whole run (the last may be shorter)
    local_steps: int  # steps per proxy in a full round


def schedule(iet: IETConfig, max_steps: int) -> Schedule:
    """The rounds and local steps of a run of `max_steps` optimizer steps over `iet.shards` proxies."""
    if iet.local_steps is not None:
        local = iet.local_steps
    else:
        local = math.ceil(max_steps / (iet.shards * (iet.rounds or DEFAULT_ROUNDS)))
    return Schedule(rounds=math.ceil(max_steps / (iet.shards * local)), local_steps=local)


def validate(config: RunConfig) -> None:
    from memsafe.models.pipeline import is_latent_pipeline  # models import the config, which imports defenses
    from memsafe.models.unet import training_timesteps

    iet, train = config.defense.iet_agc, config.train
    where = "defense.iet_agc"
    num_timesteps = training_timesteps(config.model)
    resolve_profile(iet, config.model.conditioning == "text", num_timesteps)
    if iet.shards < 1:
        raise MemsafeError(f"{where}.shards must be at least 1, got {iet.shards}")
    if iet.rounds is not None and iet.local_steps is not None:
        raise MemsafeError(f"{where}: set rounds or local_steps, not both (the other follows from train.max_steps)")
    for key in ("rounds", "local_steps"):
        if getattr(iet, key) is not None and getattr(iet, key) < 1:
            raise MemsafeError(f"{where}.{key} must be at least 1, got {getattr(iet, key)}")
    if iet.agc_ratio is not None and iet.agc_ratio < 1.0:
        raise MemsafeError(
            f"{where}.agc_ratio {iet.agc_ratio} < 1 would skip samples whose loss is above the running "
            "mean, i.e. nearly every sample; use a value >= 1 (2.0 from scratch, 1.25 when fine-tuning)"
        )
    if iet.augment and iet.augment_flip and is_latent_pipeline(config.model):
        raise MemsafeError(
            f"{where}.augment_flip: a flipped VAE latent is not the latent of the flipped image (decoded, it is "
            "off by 4.8x the VAE's own reconstruction error; docs/stable-diffusion.md), so latent runs augment by "
            "shifts only: set augment_flip: false"
        )
    if iet.agc_signal not in ("loss", "caption_gain", "caption_gain_loss"):
        raise MemsafeError(f"{where}.agc_signal must be loss, caption_gain or caption_gain_loss, got {iet.agc_signal!r}")
    if iet.agc_signal != "loss" and config.model.conditioning != "text":
        raise MemsafeError(f"{where}.agc_signal {iet.agc_signal} needs a text-conditional model (model.conditioning: text)")
    if iet.agc_timesteps is not None and not (
        len(iet.agc_timesteps) == 2 and 0 <= iet.agc_timesteps[0] < iet.agc_timesteps[1]
    ):
        raise MemsafeError(f"{where}.agc_timesteps must be [low, high) with 0 <= low < high, got {iet.agc_timesteps}")
    if iet.agc_timesteps is not None and iet.agc_timesteps[0] >= num_timesteps:
        raise MemsafeError(
            f"{where}.agc_timesteps {iet.agc_timesteps} lies past the scheduler's {num_timesteps} training timesteps: "
            f"AGC would read no draw and skip nothing; give a window within [0, {num_timesteps})"
        )
    if iet.bank_bins is not None and not 1 <= iet.bank_bins <= num_timesteps:
        raise MemsafeError(f"{where}.bank_bins must be between 1 and the scheduler's {num_timesteps} timesteps, got {iet.bank_bins}")
    if not 0.0 <= iet.bank_decay < 1.0:
        raise MemsafeError(f"{where}.bank_decay must be in [0, 1), got {iet.bank_decay}")
    if not 0.0 < iet.agc_read_share <= 1.0:
        raise MemsafeError(f"{where}.agc_read_share must be in (0, 1], got {iet.agc_read_share}")
    if iet.agc_release is not None and iet.agc_release * agc_ratio(config) < 1.0:
        raise MemsafeError(
            f"{where}.agc_release {iet.agc_release} is below the skipping threshold 1 / agc_ratio "
            f"({1 / agc_ratio(config):.4g}): a skipped sample would be released by a reading that skips it; use a "
            "value at or above it (1.0: back at the bank's mean)"
        )
    if iet.agc_latch is not None and (isinstance(iet.agc_latch, bool) or not isinstance(iet.agc_latch, int)
                                      or iet.agc_latch < 1):
        raise MemsafeError(f"{where}.agc_latch must be a whole number of readings >= 1 (or null), got {iet.agc_latch!r}")
    if iet.agc_latch_by not in ("sample", "caption"):
        raise MemsafeError(f"{where}.agc_latch_by must be sample or caption, got {iet.agc_latch_by!r}")
    if iet.agc_latch_by == "caption" and (iet.agc_latch is None or config.model.conditioning != "text"):
        raise MemsafeError(
            f"{where}.agc_latch_by caption shares a latch's streak among the samples of one caption: it needs "
            "agc_latch set and captions (model.conditioning: text)"
        )
    if iet.agc_latch_leaves not in ("batch", "shard"):
        raise MemsafeError(f"{where}.agc_latch_leaves must be batch or shard, got {iet.agc_latch_leaves!r}")
    if iet.agc_latch_leaves == "shard" and iet.agc_latch is None:
        raise MemsafeError(
            f"{where}.agc_latch_leaves shard moves latched samples out of their shard, and agc_latch is not set: no "
            "sample ever latches; set agc_latch (e.g. 3) or agc_latch_leaves: batch"
        )
    if not 0.0 < iet.agc_bank_share <= 1.0:
        raise MemsafeError(f"{where}.agc_bank_share must be in (0, 1], got {iet.agc_bank_share}")
    if iet.agc_bank_share < 1.0 and (iet.agc_per_draw or iet.agc_latch_by != "caption"):
        raise MemsafeError(
            f"{where}.agc_bank_share {iet.agc_bank_share} leaves unread the draws that can latch nothing, which only "
            "agc_latch_by: caption with agc_per_draw: false allows (otherwise every reading can skip its draw): "
            "set both, or agc_bank_share: 1.0"
        )
    if not iet.agc_per_draw and iet.agc_latch is None:
        raise MemsafeError(
            f"{where}.agc_per_draw false leaves the latch as AGC's only way to skip a sample, and agc_latch is not "
            "set: AGC would skip nothing; set agc_latch (e.g. 3) or agc_per_draw: true"
        )
    if not 0.0 <= iet.agc_smoothing < 1.0:
        raise MemsafeError(f"{where}.agc_smoothing must be in [0, 1), got {iet.agc_smoothing}")
    if iet.outer_learning_rate <= 0.0:
        raise MemsafeError(f"{where}.outer_learning_rate must be positive, got {iet.outer_learning_rate}")
    if not 0.0 <= iet.outer_momentum < 1.0:
        raise MemsafeError(f"{where}.outer_momentum must be in [0, 1), got {iet.outer_momentum}")
    if not 0.0 < iet.redistribute_threshold <= 1.0:
        raise MemsafeError(f"{where}.redistribute_threshold must be in (0, 1], got {iet.redistribute_threshold}")
    plan = schedule(iet, train.max_steps)
    if plan.rounds < MIN_ROUNDS:
        needed = MIN_ROUNDS * iet.shards * plan.local_steps
        raise MemsafeError(
            f"{where}: train.max_steps {train.max_steps} over {iet.shards} shards of {plan.local_steps} local steps "
            f"gives {plan.rounds} round(s), and IET-AGC+ needs at least {MIN_ROUNDS} to learn: raise train.max_steps "
            f"to {needed}, or set {where}.rounds (default {DEFAULT_ROUNDS}) instead of local_steps"
        )
    per_proxy = math.ceil(train.max_steps / iet.shards)
    if per_proxy <= train.warmup_steps:
        raise MemsafeError(
            f"{where}: each of the {iet.shards} proxies takes about {per_proxy} of the {train.max_steps} steps, "
            f"all within train.warmup_steps {train.warmup_steps}: raise train.max_steps above "
            f"{iet.shards * train.warmup_steps} or lower train.warmup_steps"
        )


def small_shard_warning(iet: IETConfig, num_images: int, batch_size: int) -> str | None:
    """A shard with fewer images than a batch still trains (its batches stream through several epochs),
    but every batch then repeats the shard's images: said once, not refused."""
    per_shard = num_images // iet.shards
    if per_shard >= batch_size:
        return None
    return (f"defense.iet_agc: {num_images} training images over {iet.shards} shards leave {per_shard} per shard, "
            f"fewer than train.batch_size {batch_size}, so every batch repeats the shard's images (train.batch_size "
            f"{max(1, per_shard)} or less, or more images, avoids it)")
