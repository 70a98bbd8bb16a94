"""Which per-image signal tells the duplicated emoji from the unique ones on a finished run (kept by
`bench/emoji.py --workdir DIR`), and from the unique flags (whose caption pins the image down as a
duplicate's does: the unique images AGC skips most). Every distinct training emoji is scored at
`--draws` noise draws with t in [200, 500) (the caption profile's window), averaged in log:

- `empty_gain`: loss over the loss with the empty caption (AGC's `caption_gain`);
- `neighbour_gain`: loss over the loss with the nearest other caption (MiniLM, mean-pooled), which asks
  how much this caption tells beyond a near one;
- `loss`: the conditional loss; `gain+loss`: the two z-scored and added;
- `kind_gain`: the empty gain over the median empty gain of the `--neighbours` nearest other captions (MiniLM,
  mean-pooled): how much lower than its kind's (a flag against flags) the caption's gain reads;
- `empty_loss`: the loss with the empty caption (the gain's extra pass): how well the model draws the image
  from no caption at all, which a caption that pins the image down does not lower.

Per signal: AUC of duplicated against unique, against the unique flags, and the share of unique images
(flags) that score as memorized as the least memorized duplicate. And, as AGC judges single draws, per draw:
the share of unique draws each signal skips at the caption rule's share of duplicate draws (`per_draw_skips`),
and the shares a gain bank read on the held-out images would skip (`heldout_bank`: a threshold the duplicates
do not pull down).

    python bench/emoji_signal_auc.py DIR/runs/plain-0 [DIR2/runs/...] [--draws 8] [--neighbours 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).parent))
from emoji import copies_per_emoji, distinct_emoji, duplicated_flags  # noqa: E402
from results_io import RESULTS, write_results  # noqa: E402

from memsafe.data import load_dataset  # noqa: E402
from memsafe.models.unet import build_noise_scheduler  # noqa: E402
from memsafe.runs import FinishedRun  # noqa: E402
from memsafe.train.loss import per_sample_diffusion_loss  # noqa: E402

WINDOW = (200, 500)
SCORES = ("gain", "loss", "gain+loss")


def nearest_other_captions(states: torch.Tensor, captions: list[str], count: int = 1) -> torch.Tensor:
    """(images, count): the images with the `count` nearest other captions, nearest first."""
    pooled = torch.nn.functional.normalize(states.mean(1), dim=1)
    similarity = pooled @ pooled.T
    same = torch.tensor([[a == b for b in captions] for a in captions])
    return similarity.masked_fill(same, -2.0).topk(count, dim=1).indices


@torch.no_grad()
def log_losses(run: FinishedRun, images: torch.Tensor, conditions: dict[str, torch.Tensor], draws: int) -> dict:
    """Each condition's log loss per draw (draws x images), every condition on the same noise and timesteps;
    the timesteps under "t"."""
    scheduler = build_noise_scheduler(run.config.model)
    generator = torch.Generator().manual_seed(0)
    found = {name: [] for name in [*conditions, "t"]}
    for _ in range(draws):
        noise = torch.randn(images.shape, generator=generator)
        timesteps = torch.randint(*WINDOW, (len(images),), generator=generator)
        found["t"].append(timesteps)
        for name, states in conditions.items():
            losses = [per_sample_diffusion_loss(run.unet, scheduler, images[rows], noise[rows], timesteps[rows],
                                                snr_gamma=run.config.train.snr_gamma,
                                                encoder_hidden_states=states[rows])[0]
                      for rows in torch.arange(len(images)).split(256)]
            found[name].append(torch.cat(losses).log())
    return {name: torch.stack(values) for name, values in found.items()}


def caption_draws(run_dir: Path, draws: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A finished run's distinct training emoji at `draws` noise draws each: the log losses with their own and
    with the empty caption ("own", "empty", draws x images; timesteps under "t"), how often training draws
    each image, and which are duplicated."""
    run = FinishedRun(run_dir)
    train_set, _ = load_dataset(run.config.data)
    distinct = distinct_emoji(train_set)
    states = run.encoder.encode([train_set.captions[i] for i in distinct])
    empty = run.encoder.encode([""]).expand_as(states)
    logs = log_losses(run, train_set.as_model_input()[distinct], {"own": states, "empty": empty}, draws)
    dup = duplicated_flags(Path(run.config.data.source), train_set.names)[distinct]
    return logs, copies_per_emoji(train_set, distinct), dup


def window_bin(timesteps: torch.Tensor, bins: int) -> torch.Tensor:
    """Which of `bins` equal bins of the window each timestep falls in (a bank's stand-in for nearby t)."""
    return (timesteps - WINDOW[0]) * bins // (WINDOW[1] - WINDOW[0])


def log_gain(logs: dict) -> torch.Tensor:
    """The caption's gain (AGC's `caption_gain`), in log: the own caption's log loss minus the empty one's."""
    return logs["own"] - logs["empty"]


def over_bank(log_values: torch.Tensor, timesteps: torch.Tensor, copies: torch.Tensor, bins: int = 10,
              geometric: bool = False) -> torch.Tensor:
    """Each draw's log value over its bank's. AGC's bank is a running mean over the draws of nearby timesteps,
    so each image weighs as often as training draws it (`copies`); here the bank is that weighted mean over all
    draws in the same of `bins` equal bins of the window (`geometric`: of the logs, as caption_gain_loss's
    loss bank)."""
    which = window_bin(timesteps, bins)
    weights = copies.double().expand_as(log_values)
    relative = torch.empty_like(log_values)
    for b in range(bins):
        here = which == b
        values = log_values[here] if geometric else log_values[here].exp()
        bank = (values * weights[here]).sum() / weights[here].sum()
        relative[here] = log_values[here] - (bank if geometric else bank.log())
    return relative


def per_draw_skips(logs: dict, dup: torch.Tensor, flag: torch.Tensor, copies: torch.Tensor,
                   ratio: float = 1.02) -> dict:
    """AGC judges single draws: at the share of the duplicates' draws that the caption profile's rule (gain
    below bank / `ratio`) skips, the share of the unique images' draws (and the unique flags') that each
    signal, thresholded to skip that same share of duplicate draws, skips too. gain+loss: each draw's
    relative log gain and relative log loss, each over its spread across all draws, added."""
    gain = over_bank(log_gain(logs), logs["t"], copies)
    loss = over_bank(logs["own"], logs["t"], copies)
    dup, flag = dup.expand_as(gain), flag.expand_as(gain)
    share = (gain < -math.log(ratio)).double()[dup].mean().item()
    found = {"dup_share": share, "log_spread_gain": gain.std().item(), "log_spread_loss": loss.std().item()}
    for name, score in (("gain", gain), ("loss", loss), ("gain+loss", gain / gain.std() + loss / loss.std())):
        skipped = score <= score[dup].quantile(share)
        found[name] = {"unique": skipped[~dup].double().mean().item(),
                       "unique_flags": skipped[~dup & flag].double().mean().item()}
    return found


def heldout_bank_skips(logs: dict, heldout: dict, dup: torch.Tensor, flag: torch.Tensor, ratio: float = 1.02,
                       bins: int = 10) -> dict:
    """The candidate threshold that the duplicates do not set: each training draw's gain over the mean gain of
    held-out images' draws in the same timestep bin (a bank read on images never trained on), skipped below
    bank / `ratio`. The share of duplicate, unique, unique-flag (and held-out) draws it would skip on this model."""
    gain_heldout, bin_heldout = log_gain(heldout), window_bin(heldout["t"], bins)
    threshold = torch.stack([(gain_heldout[bin_heldout == b].exp().mean() / ratio).log() for b in range(bins)])

    def skipped(found: dict) -> torch.Tensor:
        return log_gain(found) < threshold[window_bin(found["t"], bins)]

    train = skipped(logs)
    dup, flag = dup.expand_as(train), flag.expand_as(train)
    return {"dup": train[dup].double().mean().item(), "unique": train[~dup].double().mean().item(),
            "unique_flags": train[~dup & flag].double().mean().item(),
            "heldout": skipped(heldout).double().mean().item()}


def separation(memorized: torch.Tensor, dup: torch.Tensor, flag: torch.Tensor) -> dict:
    """`memorized`: higher reads more memorized."""
    unique, floor = ~dup, memorized[dup].min()
    both = dup | flag
    return {"auc_dup_vs_unique": binary_auroc(memorized, dup.long()).item(),
            "auc_dup_vs_unique_flags": binary_auroc(memorized[both], dup[both].long()).item(),
            "unique_as_memorized": (memorized[unique] >= floor).double().mean().item(),
            "unique_flags_as_memorized": (memorized[unique & flag] >= floor).double().mean().item()}


def signals(run_dir: Path, draws: int, neighbours: int) -> dict:
    run = FinishedRun(run_dir)
    train_set, holdout = load_dataset(run.config.data)
    flags = duplicated_flags(Path(run.config.data.source), train_set.names)
    distinct = distinct_emoji(train_set)
    captions = [train_set.captions[i] for i in distinct]
    states, empty = run.encoder.encode(captions), run.encoder.encode([""])
    nearest = nearest_other_captions(states, captions, max(1, neighbours))
    conditions = {"own": states, "empty": empty.expand_as(states), "neighbour": states[nearest[:, 0]]}
    per_draw = log_losses(run, train_set.as_model_input()[distinct], conditions, draws)
    logs = {name: per_draw[name].mean(0) for name in conditions}
    empty_gain, neighbour_gain = log_gain(logs), logs["own"] - logs["neighbour"]

    def z(v: torch.Tensor) -> torch.Tensor:
        return (v - v.mean()) / v.std()

    kind = empty_gain[nearest[:, :neighbours]].median(1).values
    found = {"empty_gain": empty_gain, "neighbour_gain": neighbour_gain, "loss": logs["own"],
             "gain+loss": z(empty_gain) + z(logs["own"]), "kind_gain": empty_gain - kind,
             "empty_loss": logs["empty"]}
    dup, flag = flags[distinct], torch.tensor(["flag" in caption for caption in captions])
    heldout_states = run.encoder.encode(holdout.captions)
    heldout = log_losses(run, holdout.as_model_input(),
                         {"own": heldout_states, "empty": empty.expand_as(heldout_states)}, draws)
    return ({name: separation(-value, dup, flag) for name, value in found.items()}  # low reads memorized
            | {"per_draw": per_draw_skips(per_draw, dup, flag, copies_per_emoji(train_set, distinct))
               | {"heldout_bank": heldout_bank_skips(per_draw, heldout, dup, flag)}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--neighbours", type=int, default=10, help="captions that stand for an image's kind")
    parser.add_argument("--out", type=Path, default=RESULTS / "emoji_signal_auc.json")
    args = parser.parse_args()
    results = {str(run): signals(run, args.draws, args.neighbours) for run in args.runs}
    table = ["| run | signal | AUC dup. vs unique | vs unique flags | unique as memorized | unique flags as memorized |",
             "|---|---|---|---|---|---|"]
    table += [f"| {run} | {name} | {r['auc_dup_vs_unique']:.3f} | {r['auc_dup_vs_unique_flags']:.3f} | "
              f"{r['unique_as_memorized']:.2f} | {r['unique_flags_as_memorized']:.2f} |"
              for run, by_signal in results.items() for name, r in by_signal.items() if name != "per_draw"]
    table += ["", "Single draws, each signal skipping the share of duplicate draws the caption rule skips:", "",
              "| run | dup. draws skipped | unique skipped: gain / loss / gain+loss | unique flags: gain / loss / gain+loss |",
              "|---|---|---|---|"]
    for run, by_signal in results.items():
        d = by_signal["per_draw"]
        table.append(f"| {run} | {d['dup_share']:.2f} | " + " / ".join(f"{d[n]['unique']:.3f}" for n in SCORES)
                     + " | " + " / ".join(f"{d[n]['unique_flags']:.2f}" for n in SCORES) + " |")
    table += ["", "The gain against a bank of held-out images' gains (bank / 1.02), on the same draws:", "",
              "| run | dup. draws skipped | unique | unique flags | held-out draws below |", "|---|---|---|---|---|"]
    table += [f"| {run} | {h['dup']:.2f} | {h['unique']:.3f} | {h['unique_flags']:.2f} | {h['heldout']:.2f} |"
              for run, by_signal in results.items() for h in [by_signal["per_draw"]["heldout_bank"]]]
    write_results(args.out, {"draws": args.draws, "window": list(WINDOW), "runs": results}, table)


if __name__ == "__main__":
    main()
