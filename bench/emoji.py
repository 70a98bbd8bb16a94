"""Sample-level memorization that is earned: a text-conditional DDPM on real captioned emoji at 32 px where, as
in web data, a few images are duplicated many times (default: 10 of 1,000 distinct training emoji x 100).
Plain training copies those and generalises on the rest; a defense should stop the copies at no cost in
quality. Readings per variant (seed means and spreads): copies of duplicated and of unique images (NN ratio
on distinct training images, SSCD replication rate), FID against held-out emoji, held-out denoising loss,
membership inference, training wall time.

    memsafe data emoji data/emoji32 --size 32          # once (fetches the npm packages)
    python bench/emoji.py data/emoji32 [--seeds 3] [--variants plain,plain_early_stop,iet_agc_plus] [--steps N]

Copies of the duplicated prompts and FID are also read at the guidance scales of --guidance (`g<scale>_*`;
default 3,5,7): a stronger scale cuts any model's copies, so each variant is compared over the grid, and plain
at a higher scale is a defense to beat. With --workdir DIR the runs stay in DIR/runs for
bench/emoji_guidance.py (the same grid read again on finished runs); bench/merge_runs.py adds runs written by
separate invocations to one results file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from iet import IET  # noqa: E402
from iet import VARIANTS as IET_VARIANTS  # noqa: E402
from results_io import (RESULTS, add_run, mean_change, previous_runs, run_name, same_seed_change, seed_summary,  # noqa: E402
                        variant_and_seed, write_results)

from memsafe.config import config_from_dict, merge  # noqa: E402
from memsafe.data import load_dataset  # noqa: E402
from memsafe.data.images import to_uint8  # noqa: E402
from memsafe.defenses.iet_agc.agc import latch_groups, latched  # noqa: E402
from memsafe.metrics import sscd  # noqa: E402
from memsafe.metrics.copy_detection import own_image_nearest  # noqa: E402
from memsafe.metrics.features import domain_feature_net  # noqa: E402
from memsafe.metrics.fid import fid_with_features  # noqa: E402
from memsafe.metrics.membership import attack_losses, loss_attack  # noqa: E402
from memsafe.metrics.nearest import distance_ratio, distinct_nearest_neighbours, memorized_fraction  # noqa: E402
from memsafe.models.text import TextEncoder  # noqa: E402
from memsafe.models.unet import build_noise_scheduler  # noqa: E402
from memsafe.runs import FinishedRun, run_heldout_loss, train_run  # noqa: E402
from memsafe.train.checkpoint import latest_checkpoint, read_state  # noqa: E402

# The defenses people would otherwise pick, both plain training: stopped where each of IET's K proxies stops
# (a quarter of the budget: what proxy averaging amounts to at this budget), and on deduplicated data (every
# distinct emoji once, same steps; measured against the full training set like every other variant).
VARIANTS = {"plain": IET_VARIANTS["plain"], "plain_early_stop": IET_VARIANTS["plain"],
            "plain_dedup": IET_VARIANTS["plain"]}
# IET, IET + AGC, ... under the loss rule on 4 shards (bench/iet.py's variants); IET-AGC+ so was the default
# until 2026-12-06, then named iet_agc_plus
VARIANTS |= {("iet_agc_plus_loss" if name == "iet_agc_plus" else name): value
             for name, value in IET_VARIANTS.items() if name != "plain"}
# IET-AGC+ as memsafe configures it for a text-conditional model (profile "caption", since 2026-12-06), with
# the local steps of every IET variant here: the caption rule below, read at t = 200-500 (its runs were named
# iet_agc_plus_caption_lowmid until then)
VARIANTS["iet_agc_plus"] = {"defense.name": "iet_agc", "defense.iet_agc.local_steps": IET["defense.iet_agc.local_steps"]}
# The steps to it. IET-AGC+ that judges a draw by how much its caption lowers its loss (`agc_signal:
# caption_gain`) instead of by the loss, at plain's learning speed (one shard), on single draws
# (docs/research/iet-agc.md)
VARIANTS["iet_agc_plus_caption"] = VARIANTS["iet_agc_plus_loss"] | {
    "defense.iet_agc.shards": 1, "defense.iet_agc.agc_signal": "caption_gain", "defense.iet_agc.agc_ratio": 1.02,
    "defense.iet_agc.agc_smoothing": 0.0}
# ... reading the gain only at the noise levels where it separates the duplicates (one-draw AUC > 0.8 at
# t = 225-775 in the per-timestep diagnostic); other draws are judged on their last reading, and leave the
# batch before the forward pass when it skips them
VARIANTS["iet_agc_plus_caption_mid"] = VARIANTS["iet_agc_plus_caption"] | {"defense.iet_agc.agc_timesteps": [200, 800]}
# ... reading half of those draws, at random: the extra pass on fewer draws, and a duplicate whose last
# reading skipped it leaves more of its batches before the forward pass
VARIANTS["iet_agc_plus_caption_mid_half"] = VARIANTS["iet_agc_plus_caption_mid"] | {"defense.iet_agc.agc_read_share": 0.5}
# ... read at t = 500-800 only, where one draw of the gain separated the duplicates best (AUC 0.87-0.99)
VARIANTS["iet_agc_plus_caption_late_half"] = VARIANTS["iet_agc_plus_caption_mid_half"] | {
    "defense.iet_agc.agc_timesteps": [500, 800]}
# ... read at t = 200-500 only (the late band above held the duplicates back far less): iet_agc_plus above
# ... with hysteresis: a skipped emoji stays skipped until a reading of its gain is back at the bank's mean
# (the default's hold-back eroded at twice the budget, where duplicates passed whenever a reading drifted over
# bank / lambda)
VARIANTS["iet_agc_plus_release"] = VARIANTS["iet_agc_plus"] | {"defense.iet_agc.agc_release": 1.0}
# ... judged by the gain times the loss to the power 0.25 (each over its own bank): on plain's 2,400-step models
# the gain no longer separates the duplicates (AUC 0.61: learned without their captions too), the loss does
VARIANTS["iet_agc_plus_gain_loss"] = VARIANTS["iet_agc_plus"] | {"defense.iet_agc.agc_signal": "caption_gain_loss"}
# ... both: the gain and loss, with hysteresis
VARIANTS["iet_agc_plus_gain_loss_release"] = VARIANTS["iet_agc_plus_gain_loss"] | {"defense.iet_agc.agc_release": 1.0}
# ... a bank that does not sway with which images were drawn last: 20 bins of 50 timesteps, decay 0.98 (about
# 100 recent draws instead of 9), on the default's rule and on the rule with both
POOLED_BANK = {"defense.iet_agc.bank_bins": 20, "defense.iet_agc.bank_decay": 0.98}
VARIANTS["iet_agc_plus_pooled_bank"] = VARIANTS["iet_agc_plus"] | POOLED_BANK
VARIANTS["iet_agc_plus_gain_loss_release_pooled_bank"] = VARIANTS["iet_agc_plus_gain_loss_release"] | POOLED_BANK
# ... the default's rule with hysteresis on the pooled bank (each helped on seed 1 at twice the budget)
VARIANTS["iet_agc_plus_release_pooled_bank"] = VARIANTS["iet_agc_plus_release"] | POOLED_BANK
# ... hysteresis with the gain read at t = 200-800 (twice the default's readings per sample: a copy of a duplicate
# is read about five times in 1,200 steps, so each flag rests on few readings)
VARIANTS["iet_agc_plus_mid_release"] = VARIANTS["iet_agc_plus_release"] | {"defense.iet_agc.agc_timesteps": [200, 800]}
# ... and a latch: three readings in a row under bank / lambda hold a sample for the rest of the run (every
# per-draw rule passes a share of a memorized copy's draws, so its cut fell with the budget)
VARIANTS["iet_agc_plus_mid_release_latch"] = VARIANTS["iet_agc_plus_mid_release"] | {"defense.iet_agc.agc_latch": 3}
# ... four readings in a row (at 2,400 steps three latched 21 % of the unique emoji beside 92 % of the copies)
VARIANTS["iet_agc_plus_mid_release_latch4"] = VARIANTS["iet_agc_plus_mid_release"] | {"defense.iet_agc.agc_latch": 4}
# ... latch 3 by caption: the copies of one caption share one streak, and a caption one sample alone carries
# never latches (by sample, the latch held 81-85 % of the unique flags at 2,400 steps: their captions pin them)
VARIANTS["iet_agc_plus_mid_release_latch_caption"] = VARIANTS["iet_agc_plus_mid_release_latch"] | {
    "defense.iet_agc.agc_latch_by": "caption"}
# ... with no per-draw skips: readings only count toward the latch by caption, and only latched draws leave (the
# per-draw rule skipped 17-18 % of the unique images' draws once the copies had latched)
VARIANTS["iet_agc_plus_mid_latch_caption_only"] = VARIANTS["iet_agc_plus_mid_release_latch_caption"] | {
    "defense.iet_agc.agc_per_draw": False}
# ... and no loss-driven augmentation: with the copies latched, the bank is the unique images' own mean, and half
# their draws read under it and are augmented (mean strength 0.39 by 1,000 steps)
VARIANTS["iet_agc_plus_mid_latch_caption_only_no_augment"] = VARIANTS["iet_agc_plus_mid_latch_caption_only"] | {
    "defense.iet_agc.augment": False}
# ... and a latched emoji leaves its shard at the next round: the batches fill with the others, as on deduplicated
# data (by batch, the unique emoji are drawn no more often than beside the copies)
VARIANTS["iet_agc_plus_mid_latch_caption_retire"] = VARIANTS["iet_agc_plus_mid_latch_caption_only"] | {
    "defense.iet_agc.agc_latch_leaves": "shard"}
VARIANTS["iet_agc_plus_mid_latch_caption_retire_no_augment"] = VARIANTS["iet_agc_plus_mid_latch_caption_retire"] | {
    "defense.iet_agc.augment": False}
# ... reading a caption of its own (which can latch nothing) on a tenth of its draws, for the bank, in bins of ten
# timesteps (each bin then updated about as often as one timestep was): the gain's extra pass was the whole of the
# variant's extra time (69 s of 61 s more than plain in a 400-step profile, docs/research/iet-agc.md)
LEAN_READING = {"defense.iet_agc.agc_bank_share": 0.1, "defense.iet_agc.bank_bins": 100}
VARIANTS["iet_agc_plus_mid_latch_caption_retire_no_augment_lean"] = VARIANTS[
    "iet_agc_plus_mid_latch_caption_retire_no_augment"] | LEAN_READING
# ... the lean reading without leaving the shard: a latched emoji's draws leave each batch (the default
# `agc_latch_leaves: batch`), so once the copies have latched a batch holds only the unique images' draws, as
# many as beside the copies: half the compute on this split (half its images are copies)
VARIANTS["iet_agc_plus_mid_latch_caption_only_no_augment_lean"] = VARIANTS[
    "iet_agc_plus_mid_latch_caption_only_no_augment"] | LEAN_READING
# The lean variant's rounds on its one shard, AGC reading the loss (no extra pass) and skipping nothing: what the
# driver alone costs beside plain (wall pairs)
VARIANTS["iet_one_shard"] = {"defense.name": "iet_agc", "defense.iet_agc.local_steps": IET["defense.iet_agc.local_steps"],
                             "defense.iet_agc.shards": 1, "defense.iet_agc.agc": False, "defense.iet_agc.agc_signal": "loss",
                             "defense.iet_agc.redistribute": False, "defense.iet_agc.augment": False}
# ... in the fewest rounds the driver allows (5): whether its cost is per round
VARIANTS["iet_one_shard_5_rounds"] = VARIANTS["iet_one_shard"] | {"defense.iet_agc.local_steps": None,
                                                                   "defense.iet_agc.rounds": 5}
UNDEFENDED = ("plain", "plain_early_stop", "plain_dedup")

READINGS = ("dup_extracted_sscd", "unique_extracted_sscd", "holdout_extracted_sscd",
            "dup_memorized_nn", "dup_copy_rate_sscd", "unique_memorized_nn", "unique_copy_rate_sscd",
            "holdout_copy_rate_sscd", "fid", "heldout_loss", "mia_auc", "mia_tpr_at_1pct_fpr", "dup_mia_auc",
            "dup_loss_ratio", "dup_skip_rate", "unique_skip_rate", "dup_latched", "unique_latched", "wall_s")


def base_config(train: Path, holdout: Path, steps: int) -> dict:
    return {
        "data": {"source": str(train), "holdout_source": str(holdout), "resolution": 32, "channels": 3},
        "model": {"conditioning": "text", "text_encoder": "builtin:minilm", "max_text_length": 24,
                  # sized to 15 minutes a run on 2 cores: attention at 16x16 doubles the step time
                  "block_out_channels": [32, 64, 64], "layers_per_block": 1,
                  "attention_levels": [False, False, True]},
        # 5e-4 without EMA left every sample grainy and no duplicate copied (docs/research/iet-agc.md)
        "train": {"max_steps": steps, "batch_size": 32, "learning_rate": 2e-3, "warmup_steps": 100,
                  "snr_gamma": 5.0, "ema": True, "ema_decay": 0.995,
                  "caption_dropout": 0.1, "checkpoint_every": steps, "log_every": 50},
        # this undertrained model's error at low noise adds grain at every DDIM step there: 10 steps beat 25 and 100
        "eval": {"sampling_steps": 10, "guidance_scale": 3.0, "batch_size": 128},
    }


# The benchmark's split: 1,000 distinct training emoji, 10 of them x 100 (50 x 20 copied nothing at the first
# sizing; 10 x 100 is the one measured since, docs/research/iet-agc.md), 500 held out.
SPLIT = {"distinct": 1000, "duplicated": 10, "copies": 100, "holdout": 500}


def split_emoji(folder: Path, work: Path, distinct: int = SPLIT["distinct"], duplicated: int = SPLIT["duplicated"],
                copies: int = SPLIT["copies"], holdout: int = SPLIT["holdout"], seed: int = 0) -> tuple[Path, Path]:
    """train/ (distinct emoji once, `duplicated` of them `copies` times, hard links), train_dedup/ (every
    distinct emoji once) and holdout/, split by emoji name so both art styles of one emoji fall on the same
    side; skin-tone variants left out (they are near-copies of one another)."""
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    records = [r for r in records if "skin tone" not in r["name"]]
    names = sorted({r["name"] for r in records})
    random.Random(seed).shuffle(names)
    by_name: dict[str, list[dict]] = {}
    for record in records:
        by_name.setdefault(record["name"], []).append(record)
    picked_train, picked_holdout = [], []
    for name in names:
        side = picked_train if len(picked_train) < distinct else picked_holdout
        if len(picked_holdout) >= holdout:
            break
        side.extend(by_name[name])
    picked_train, picked_holdout = picked_train[:distinct], picked_holdout[:holdout]
    if len(picked_train) < distinct or len(picked_holdout) < holdout:
        raise SystemExit(f"{folder} has too few distinct emoji for {distinct} training + {holdout} held-out images")
    dup = set(random.Random(seed + 1).sample(range(distinct), duplicated))
    for side, picked in (("train", picked_train), ("train_dedup", picked_train), ("holdout", picked_holdout)):
        (work / side).mkdir(parents=True)
        lines = []
        for index, record in enumerate(picked):
            repeats = copies if side == "train" and index in dup else 1
            for copy in range(repeats):
                name = f"{index:05d}-{copy:02d}.png"
                os.link(folder / record["file_name"], work / side / name)
                lines.append(json.dumps({"file_name": name, "text": record["text"], "duplicated": repeats > 1,
                                         "source": record["file_name"]}))
        (work / side / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return work / "train", work / "holdout"


def duplicated_flags(train: Path, names: list[str]) -> torch.Tensor:
    flags = {}
    for line in (train / "metadata.jsonl").read_text().splitlines():
        record = json.loads(line)
        flags[record["file_name"]] = record["duplicated"]
    return torch.tensor([flags[n] for n in names])


def distinct_emoji(train_set) -> list[int]:
    """The index of each distinct training emoji: its first copy (split_emoji names copies NNNNN-CC.png)."""
    return [i for i, name in enumerate(train_set.names) if name.endswith("-00.png")]


def copies_per_emoji(train_set, distinct: list[int]) -> torch.Tensor:
    """How many copies the training set holds of each emoji of `distinct` (NNNNN-CC.png: copy CC of NNNNN)."""
    emoji = [name.rsplit("-", 1)[0] for name in train_set.names]
    counts = Counter(emoji)
    return torch.tensor([counts[emoji[i]] for i in distinct])


def prompt_groups(train_set, holdout, dup: torch.Tensor, samples_per_group: int, seed: int):
    """The distinct training emoji (first copies), and the emoji and prompts of the three groups generated
    for: duplicated ones (drawn with replacement), unique ones, and every held-out one."""
    distinct = distinct_emoji(train_set)
    generator = random.Random(seed)
    own = {"dup": [generator.choice([i for i in distinct if dup[i]]) for _ in range(samples_per_group)],
           "unique": generator.sample([i for i in distinct if not dup[i]], samples_per_group),
           "holdout": list(range(len(holdout)))}
    prompts = {group: [(holdout if group == "holdout" else train_set).captions[i] for i in own[group]]
               for group in own}
    return distinct, own, prompts


class Probe:
    """What one model's generations are read against, built once per run: the prompt groups, the SSCD
    embeddings of the distinct training emoji and of the held-out ones, and FID's feature net."""

    def __init__(self, config, train_set, holdout, dup: torch.Tensor, samples_per_group: int, seed: int):
        self.holdout = holdout
        self.distinct, self.own, self.prompts = prompt_groups(train_set, holdout, dup, samples_per_group, seed)
        real = torch.cat([train_set.as_model_input()[self.distinct], holdout.as_model_input()])
        self.feature_net = domain_feature_net(real, False)
        self.detector = sscd.SSCD(config.eval.sscd_size)
        self.references = sscd.cached_embeddings(self.detector, train_set.pixels[self.distinct])
        self.holdout_references = sscd.cached_embeddings(self.detector, holdout.pixels)
        row = {index: r for r, index in enumerate(self.distinct)}
        self.rows = {group: torch.tensor([row[i] for i in self.own[group]]) for group in ("dup", "unique")}

    def drawn(self, embedded: torch.Tensor, group: str) -> float:
        """The share of the group's generations whose SSCD-nearest image is the prompt's own emoji."""
        rows = self.rows[group]
        return own_image_nearest(embedded, self.references[rows], self.references, own_index=rows).double().mean().item()

    def fid(self, generated: torch.Tensor) -> float:
        return fid_with_features(self.holdout.as_model_input(), generated, self.feature_net)

    def at_scale(self, sample, scale: float) -> dict:
        """Copies of the duplicated prompts and FID of the held-out ones, sampled by `sample` (a run's
        `prompt_sampler`) at guidance `scale`."""
        embedded = self.detector.embed(to_uint8(sample(self.prompts["dup"], scale)))
        found, _ = sscd.replication_statistics(embedded, self.references, self.holdout_references)
        return {"dup_extracted_sscd": self.drawn(embedded, "dup"), "dup_copy_rate_sscd": found["copy_rate_sscd"],
                "fid": self.fid(sample(self.prompts["holdout"], scale))}


def kept_run_probe(run: FinishedRun, samples_per_group: int) -> Probe:
    """The Probe this benchmark read a run it kept with (DIR/runs/VARIANT-SEED: the seed picks the prompts)."""
    train_set, holdout = load_dataset(run.config.data)
    flags = duplicated_flags(Path(run.config.data.source), train_set.names)
    return Probe(run.config, train_set, holdout, flags, samples_per_group, variant_and_seed(run.dir.name)[1])


GRID_READINGS = ("dup_extracted_sscd", "dup_copy_rate_sscd", "fid")


def grid_key(scale: float, reading: str) -> str:
    return f"g{scale:g}_{reading}"


def grid_reading(key: str) -> tuple[float, str] | None:
    """(scale, reading) of a guidance-grid key `g<scale>_<reading>`, else None."""
    found = re.fullmatch(r"g([0-9.]+)_(\w+)", key)
    return (float(found[1]), found[2]) if found and found[2] in GRID_READINGS else None


def summary_keys(runs: list[dict]) -> tuple[str, ...]:
    """The readings summarised over seeds: READINGS and the guidance grid's (`g<scale>_*`) the runs have."""
    return READINGS + tuple(sorted({key for run in runs for key in run if grid_reading(key)}))


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Each variant's seed summary, in VARIANTS order."""
    return {name: seed_summary(runs[name], summary_keys(runs[name])) for name in VARIANTS if name in runs}


def measure(run_dir: Path, config, samples_per_group: int, seed: int, scales: list[float]) -> dict:
    """Copies three ways: the NN ratio in pixels, the literature's SSCD replication rate (cosine > 0.5 to any
    training emoji) and `*_extracted_sscd`, the share of generations whose SSCD-nearest image, among the
    distinct training emoji and the prompt's own emoji, is that own emoji (for held-out prompts, whose emoji
    was never trained on, it is the rate a caption alone gets there). At the config's guidance scale, all of
    them; at every other scale of `scales`, the duplicated prompts' copies and FID (`g<scale>_*`)."""
    train_set, holdout = load_dataset(config.data)
    dup = duplicated_flags(Path(config.data.source), train_set.names)
    probe = Probe(config, train_set, holdout, dup, samples_per_group, seed)
    distinct = probe.distinct
    dup_distinct = [i for i in distinct if dup[i]]
    unique = [i for i in distinct if not dup[i]]
    run = FinishedRun(run_dir, config)
    sample = run.sampler(config.eval.seed)
    generated = {group: sample(group_prompts) for group, group_prompts in probe.prompts.items()}

    train_images = train_set.as_model_input()
    embedded = {group: probe.detector.embed(to_uint8(images)) for group, images in generated.items()}
    found = own_image_nearest(embedded["holdout"], probe.holdout_references, probe.references)
    readings = {"holdout_extracted_sscd": found.double().mean().item()}
    for group in ("dup", "unique"):
        readings[f"{group}_extracted_sscd"] = probe.drawn(embedded[group], group)
        ratios = distance_ratio(distinct_nearest_neighbours(generated[group], train_images, k=2))
        readings[f"{group}_memorized_nn"] = memorized_fraction(ratios, config.eval.memorization_threshold)
        found, _ = sscd.replication_statistics(embedded[group], probe.references, probe.holdout_references)
        readings[f"{group}_copy_rate_sscd"] = found["copy_rate_sscd"]
        readings[f"{group}_sim_95pc_sscd"] = found["sim_95pc_sscd"]
        readings["holdout_copy_rate_sscd"] = found["holdout_copy_rate_sscd"]
    readings["fid"] = probe.fid(generated["holdout"])
    readings["heldout_loss"] = run_heldout_loss(run, holdout).mean().item()
    readings |= membership(run.unet, config, train_set, holdout, unique, dup_distinct)
    for scale in scales:
        at_scale = ({k: readings[k] for k in GRID_READINGS} if scale == config.eval.guidance_scale
                    else probe.at_scale(sample, scale))
        readings |= {grid_key(scale, k): v for k, v in at_scale.items()}
    return readings | agc_skip_rates(run_dir, dup, config.defense.iet_agc, train_set.captions)


def agc_skip_rates(run_dir: Path, dup: torch.Tensor, iet=None, captions: list[str] | None = None) -> dict:
    """AGC's premise checked where it matters: the share of the duplicated images' visits that AGC skipped
    over the run, beside the unique images' (from the last checkpoint's ledger; IET runs only); with a latch
    (`iet`, the run's defense.iet_agc), the share of each kind's training samples (copies counted one by one)
    latched by the end."""
    last = latest_checkpoint(run_dir / "checkpoints")
    if last is None or not (last / "iet.json").is_file():
        return {}
    ledger = read_state(last / "iet")["ledger"]

    def rate(mask: torch.Tensor) -> float:
        return (ledger["skips"][mask].sum() / ledger["visits"][mask].sum().clamp_min(1)).item()

    rates = {"dup_skip_rate": rate(dup), "unique_skip_rate": rate(~dup)}
    if iet is None or iet.agc_latch is None or "streak" not in ledger:
        return rates
    held = latched(ledger["streak"], iet.agc_latch, torch.arange(len(dup)), latch_groups(iet.agc_latch_by, captions))
    return rates | {"dup_latched": held[dup].double().mean().item(),
                    "unique_latched": held[~dup].double().mean().item()}


def membership(unet, config, train_set, holdout, unique: list[int], dup_distinct: list[int]) -> dict:
    """Loss attack on distinct unique training emoji vs held-out ones (as many of each), and on the duplicated
    emoji vs as many held-out ones; `dup_loss_ratio` is their mean error over the unique ones' (AGC's premise:
    below 1 when memorized images have the lower loss)."""
    encoder = TextEncoder(config.model.text_encoder, config.model.max_text_length)
    scheduler = build_noise_scheduler(config.model)

    def losses(images) -> torch.Tensor:
        return attack_losses(unet, scheduler, images.as_model_input(), encoder.encode_unique(images.captions))

    count = min(len(unique), len(holdout))
    unique_losses, holdout_losses = losses(train_set.subset(unique[:count])), losses(holdout.subset(range(count)))
    dup_losses = losses(train_set.subset(dup_distinct))
    found = loss_attack(unique_losses, holdout_losses)
    return {"mia_auc": found["mia_auc"], "mia_tpr_at_1pct_fpr": found["mia_tpr_at_1pct_fpr"],
            "dup_mia_auc": loss_attack(dup_losses, holdout_losses[: len(dup_losses)])["mia_auc"],
            "dup_loss_ratio": (dup_losses.mean() / unique_losses.mean()).item()}


def run_variant(name: str, seed: int, args, train: Path, holdout: Path, root: Path, extra: dict) -> dict:
    steps = args.steps // IET["defense.iet_agc.shards"] if name == "plain_early_stop" else args.steps
    values = base_config(train, holdout, steps)
    config = merge(config_from_dict(values), VARIANTS[name] | (extra if name not in UNDEFENDED else {})
                   | {"train.seed": seed, "output_dir": str(root / run_name(name, seed))})
    trained_on = merge(config, {"data.source": str(train.parent / "train_dedup")}) if name == "plain_dedup" else config
    started = time.perf_counter()
    run_dir = train_run(trained_on, progress=sys.stderr.isatty())
    wall = time.perf_counter() - started
    return {"seed": seed, "wall_s": wall, "steps": steps, **measure(run_dir, config, args.samples, seed, args.scales)}


def markdown(results: dict) -> list[str]:
    plain = results.get("plain")
    shown = ("dup_extracted_sscd", "unique_extracted_sscd", "holdout_extracted_sscd", "dup_memorized_nn",
             "dup_copy_rate_sscd", "unique_copy_rate_sscd", "holdout_copy_rate_sscd", "fid",
             "heldout_loss", "mia_auc", "dup_loss_ratio", "dup_skip_rate", "unique_skip_rate", "wall_s")
    lines = ["| variant | " + " | ".join(shown) + " | FID vs plain's mean | held-out loss vs plain, same seeds |",
             "|---|" + "---|" * (len(shown) + 2)]
    for name, r in results.items():
        cells = [f"{r[k]:.3f} ± {r[f'{k}_std']:.3f}" if k in r else "-" for k in shown]
        plain_runs = plain["runs"] if plain else []
        relative = [mean_change(r["runs"], plain_runs, "fid"), same_seed_change(r["runs"], plain_runs, "heldout_loss")]
        lines.append(f"| {name} | " + " | ".join(cells + relative) + " |")
    return lines + [""] + guidance_table(results)


def guidance_table(results: dict) -> list[str]:
    """Own emoji drawn by the duplicated prompts and FID at each guidance scale measured: a stronger scale
    pushes any model's samples off its training images, so plain at a higher scale is a defense too."""
    scales = sorted({found[0] for r in results.values() for key in r if (found := grid_reading(key))})
    if not scales:
        return []
    lines = ["| variant | " + " | ".join(f"guidance {s:g}: drawn (dup.) / FID" for s in scales) + " |",
             "|---|" + "---|" * len(scales)]
    for name, r in results.items():
        cells = []
        for scale in scales:
            drawn, fid = grid_key(scale, "dup_extracted_sscd"), grid_key(scale, "fid")
            cells.append(f"{r[drawn]:.2f} ± {r[drawn + '_std']:.2f} / {r[fid]:.2f} ± {r[fid + '_std']:.2f}"
                         if fid in r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by `memsafe data emoji ... --size 32`")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", help="comma-separated seeds instead of 0..seeds-1")
    parser.add_argument("--variants", default="plain,plain_early_stop,iet,iet_agc,iet_agc_plus")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--distinct", type=int, default=SPLIT["distinct"], help="distinct training emoji")
    parser.add_argument("--duplicated", type=int, default=SPLIT["duplicated"], help="how many of them are duplicated")
    parser.add_argument("--copies", type=int, default=SPLIT["copies"], help="copies of each duplicated emoji")
    parser.add_argument("--holdout", type=int, default=SPLIT["holdout"])
    parser.add_argument("--samples", type=int, default=100, help="generations per group (duplicated, unique)")
    parser.add_argument("--guidance", default="3,5,7",
                        help="guidance scales at which the duplicated prompts' copies and FID are also read")
    parser.add_argument("--out", default=str(RESULTS / "emoji.json"))
    parser.add_argument("--merge", action="store_true", help="add to an existing --out (same variant+seed replaced)")
    parser.add_argument("--workdir", help="keep the split data and the runs here (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for defended variants")
    args = parser.parse_args()
    args.scales = [float(scale) for scale in args.guidance.split(",") if scale]
    import yaml

    extra = {k: yaml.safe_load(v) for k, _, v in (pair.partition("=") for pair in args.set)}
    names = args.variants.split(",")
    out = Path(args.out)
    runs, history = previous_runs(out, args.merge)
    settings = {k: getattr(args, k) for k in ("steps", "distinct", "duplicated", "copies", "holdout", "samples", "scales")}
    keep = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    with keep as tmp:
        train, holdout = split_emoji(Path(args.folder), Path(tmp) / "data", args.distinct, args.duplicated,
                                     args.copies, args.holdout)
        for seed in [int(s) for s in args.seed_list.split(",")] if args.seed_list else range(args.seeds):
            for name in names:
                record = run_variant(name, seed, args, train, holdout, Path(tmp) / "runs", extra)
                add_run(runs, name, record)
                print(json.dumps({"variant": name, **record}), flush=True)
                results = summarise(runs)
                write_results(out, results | history | {"settings": settings | {"set": extra}}, markdown(results), echo=False)
    print("\n".join(markdown(results)))


if __name__ == "__main__":
    main()
